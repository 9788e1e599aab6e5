//! [`DeviceStore`] on redb: table `devices` (device id → [`Device`] as JSON).

use async_trait::async_trait;
use redb::ReadableTable;

use super::{from_json, not_found, to_json, Db, EmbeddedBackend, DEVICES};
use crate::{Device, DeviceStore, Result};

#[async_trait]
impl DeviceStore for EmbeddedBackend {
    async fn insert_device(&self, device: &Device) -> Result<()> {
        let (id, bytes) = (device.device_id, to_json(device)?);
        self.write(move |t| {
            t.devices.insert(id, bytes.as_slice()).db()?;
            Ok(())
        })
        .await
    }

    async fn get_device(&self, device_id: i64) -> Result<Option<Device>> {
        self.point(move |tx| {
            let table = tx.open_table(DEVICES).db()?;
            let row = table.get(device_id).db()?;
            row.map(|v| from_json(v.value(), "device")).transpose()
        })
        .await
    }

    async fn revoke_tokens_before(&self, device_id: i64, before_ms: i64) -> Result<()> {
        self.write(move |t| {
            let table = &mut t.devices;
            let mut device: Device = match table.get(device_id).db()? {
                Some(v) => from_json(v.value(), "device")?,
                None => return Err(not_found("device", device_id)),
            };
            // Never re-validate tokens an earlier sign-out revoked.
            device.tokens_valid_after_ms = device.tokens_valid_after_ms.max(before_ms);
            table.insert(device_id, to_json(&device)?.as_slice()).db()?;
            Ok(())
        })
        .await
    }

    async fn bind_device(&self, device_id: i64, user_id: i64) -> Result<i64> {
        self.write(move |t| {
            let table = &mut t.devices;
            let mut device: Device = match table.get(device_id).db()? {
                Some(v) => from_json(v.value(), "device")?,
                None => return Err(not_found("device", device_id)),
            };
            if device.owner_user_id == 0 {
                device.owner_user_id = user_id;
                table.insert(device_id, to_json(&device)?.as_slice()).db()?;
            }
            Ok(device.owner_user_id)
        })
        .await
    }
}
