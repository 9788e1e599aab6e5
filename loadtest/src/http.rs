//! The few user-api calls a client makes before it connects.

use anyhow::Context;
use serde_json::{json, Value};

use crate::client::Credentials;

/// A user-api client.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

async fn ok_json(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "HTTP {status}: {body}");
    Ok(body)
}

impl Api {
    /// A client of the user-api at `base` (e.g. `http://127.0.0.1:7000`).
    pub fn new(base: impl Into<String>) -> Self {
        Api {
            base: base.into().trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// POST `path` with `body`, returning the JSON answer.
    ///
    /// # Errors
    /// On transport failure or a non-2xx status.
    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        ok_json(req.send().await.with_context(|| format!("POST {path}"))?).await
    }

    /// GET `path` with a bearer token.
    ///
    /// # Errors
    /// On transport failure or a non-2xx status.
    pub async fn get(&self, path: &str, token: &str) -> anyhow::Result<Value> {
        let req = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token);
        ok_json(req.send().await.with_context(|| format!("GET {path}"))?).await
    }

    /// POST `path` with the admin secret header (app-backend calls).
    ///
    /// # Errors
    /// On transport failure or a non-2xx status.
    pub async fn post_admin(
        &self,
        path: &str,
        admin_secret: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        self.admin(reqwest::Method::POST, path, admin_secret, body)
            .await
    }

    /// PUT `path` with the admin secret header.
    ///
    /// # Errors
    /// On transport failure or a non-2xx status.
    pub async fn put_admin(
        &self,
        path: &str,
        admin_secret: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        self.admin(reqwest::Method::PUT, path, admin_secret, body)
            .await
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        admin_secret: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("x-admin-secret", admin_secret)
            .json(&body);
        ok_json(
            req.send()
                .await
                .with_context(|| format!("{method} {path}"))?,
        )
        .await
    }

    /// Registers a device and returns its id.
    ///
    /// # Errors
    /// On failure.
    pub async fn register_device(&self, device_type: &str) -> anyhow::Result<i64> {
        let v = self
            .post(
                "/v1/devices",
                None,
                json!({"type": device_type, "brand": "zhibo", "model": "cli", "system_version": "1", "sdk_version": "1"}),
            )
            .await?;
        v["device_id"].as_i64().context("device_id in answer")
    }

    /// Signs up (ignoring "taken") and signs in; returns credentials for `device_id`.
    ///
    /// # Errors
    /// On failure.
    pub async fn sign_up_and_in(
        &self,
        username: &str,
        password: &str,
        device_id: i64,
    ) -> anyhow::Result<Credentials> {
        let _ = self
            .post(
                "/v1/users",
                None,
                json!({"username": username, "password": password, "nickname": username}),
            )
            .await;
        let v = self
            .post(
                "/v1/sessions",
                None,
                json!({"username": username, "password": password, "device_id": device_id}),
            )
            .await?;
        Ok(Credentials {
            user_id: v["user_id"].as_i64().context("user_id")?,
            device_id,
            token: v["token"].as_str().context("token")?.to_owned(),
        })
    }
}
