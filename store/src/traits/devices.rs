//! Devices: one record per app install, bound to its first user.

use async_trait::async_trait;

#[cfg(doc)]
use crate::ErrorKind;
use crate::{Device, Result};

/// Devices: registered once per app install.
#[async_trait]
pub trait DeviceStore: Send + Sync {
    /// Stores a new device (its `device_id` already allocated).
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn insert_device(&self, device: &Device) -> Result<()>;
    /// The device, if registered.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] on backend failure.
    async fn get_device(&self, device_id: i64) -> Result<Option<Device>>;
    /// Tokens of this device issued before `before_ms` (Unix ms) are no longer valid (sign-out).
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown device.
    async fn revoke_tokens_before(&self, device_id: i64, before_ms: i64) -> Result<()>;
    /// Binds the device to `user_id` if it is not bound yet, atomically (the first of two racing users
    /// wins), and returns its owner after the call: `user_id`, or the other user it already belongs to.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown device; [`ErrorKind::Unavailable`] on backend failure.
    async fn bind_device(&self, device_id: i64, user_id: i64) -> Result<i64>;
}
