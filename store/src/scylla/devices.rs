//! [`DeviceStore`] on Scylla: table `devices` (one row per app install; `owner_user_id` bound once with
//! a lightweight transaction, token revocation only moving forward).

use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::DeserializeRow;

use super::ScyllaBackend;
use crate::{Device, DeviceStore, Error, ErrorKind, Result};

const DEVICE_COLUMNS: &str = "device_id, device_type, brand, model, system_version, sdk_version, \
     tokens_valid_after_ms, created_at_ms, owner_user_id";

/// The device statements, prepared once.
pub(super) struct Statements {
    insert_device: PreparedStatement,
    get_device: PreparedStatement,
    revoke_tokens: PreparedStatement,
    bind_device: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session) -> Result<Self> {
        let p = |cql: String| super::prepare(session, cql);
        Ok(Statements {
            insert_device: p(format!(
                "INSERT INTO devices ({DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            get_device: p(format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?"
            ))
            .await?,
            revoke_tokens: p(
                "UPDATE devices SET tokens_valid_after_ms = ? WHERE device_id = ? \
                 IF tokens_valid_after_ms < ?"
                    .into(),
            )
            .await?,
            // Only called for a device read as existing (devices are never deleted): on a missing row
            // `IF owner_user_id = null` would hold and create one.
            bind_device: p("UPDATE devices SET owner_user_id = ? WHERE device_id = ? \
                 IF owner_user_id = null"
                .into())
            .await?,
        })
    }
}

#[derive(DeserializeRow)]
struct DeviceRow {
    device_id: i64,
    device_type: String,
    brand: String,
    model: String,
    system_version: String,
    sdk_version: String,
    tokens_valid_after_ms: i64,
    created_at_ms: i64,
    /// Null until the first sign-in binds the device (`0004_security.cql`).
    owner_user_id: Option<i64>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        Device {
            device_id: r.device_id,
            device_type: r.device_type,
            brand: r.brand,
            model: r.model,
            system_version: r.system_version,
            sdk_version: r.sdk_version,
            tokens_valid_after_ms: r.tokens_valid_after_ms,
            created_at_ms: r.created_at_ms,
            owner_user_id: r.owner_user_id.unwrap_or(0),
        }
    }
}

#[async_trait]
impl DeviceStore for ScyllaBackend {
    async fn insert_device(&self, d: &Device) -> Result<()> {
        let values = (
            d.device_id,
            &d.device_type,
            &d.brand,
            &d.model,
            &d.system_version,
            &d.sdk_version,
            d.tokens_valid_after_ms,
            d.created_at_ms,
            (d.owner_user_id != 0).then_some(d.owner_user_id),
        );
        self.exec("insert device", &self.devices.insert_device, values)
            .await?;
        Ok(())
    }

    async fn get_device(&self, device_id: i64) -> Result<Option<Device>> {
        let row: Option<DeviceRow> = self
            .one("get device", &self.devices.get_device, (device_id,))
            .await?;
        Ok(row.map(Device::from))
    }

    async fn revoke_tokens_before(&self, device_id: i64, before_ms: i64) -> Result<()> {
        // Conditional so the cut-off only moves forward: an earlier `before_ms` changes nothing.
        let lwt = self
            .lwt(
                "revoke tokens",
                &self.devices.revoke_tokens,
                (before_ms, device_id, before_ms),
            )
            .await?;
        // Not applied: either the row is missing (no current value) or its cut-off is already later.
        if lwt.applied || lwt.bigint("tokens_valid_after_ms").is_some() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotFound,
                format!("device {device_id}"),
            ))
        }
    }

    async fn bind_device(&self, device_id: i64, user_id: i64) -> Result<i64> {
        let device = self
            .get_device(device_id)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("device {device_id}")))?;
        if device.owner_user_id != 0 {
            return Ok(device.owner_user_id);
        }
        let lwt = self
            .lwt(
                "bind device",
                &self.devices.bind_device,
                (user_id, device_id),
            )
            .await?;
        if lwt.applied {
            return Ok(user_id);
        }
        // Another user's bind won the race: the not-applied result carries the current owner.
        lwt.bigint("owner_user_id").ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("device {device_id}: bind not applied and no owner"),
            )
        })
    }
}
