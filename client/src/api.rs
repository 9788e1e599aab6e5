//! The few user-api calls a client makes before it connects (and the chat CLI's friend and search calls).

use serde_json::{json, Value};

use crate::conn::Credentials;

/// A failed user-api call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request did not complete.
    #[error("{what}: {source}")]
    Transport {
        /// Method and path.
        what: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with a non-2xx status.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status.
        status: reqwest::StatusCode,
        /// The JSON body (`{"code": ..., "message": ...}`), or null.
        body: Value,
    },
    /// The answer lacked a field.
    #[error("no {0} in the answer")]
    Missing(&'static str),
}

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// A user-api client.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

async fn ok_json(resp: reqwest::Response) -> Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(ApiError::Status { status, body });
    }
    Ok(body)
}

fn transport(what: String) -> impl FnOnce(reqwest::Error) -> ApiError {
    move |source| ApiError::Transport { what, source }
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
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Result<Value> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        ok_json(
            req.send()
                .await
                .map_err(transport(format!("POST {path}")))?,
        )
        .await
    }

    /// GET `path` with a bearer token.
    ///
    /// # Errors
    /// On transport failure or a non-2xx status.
    pub async fn get(&self, path: &str, token: &str) -> Result<Value> {
        let req = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token);
        ok_json(req.send().await.map_err(transport(format!("GET {path}")))?).await
    }

    /// POST `path` with the admin secret header (app-backend calls).
    ///
    /// # Errors
    /// On transport failure or a non-2xx status.
    pub async fn post_admin(&self, path: &str, admin_secret: &str, body: Value) -> Result<Value> {
        self.admin(reqwest::Method::POST, path, admin_secret, body)
            .await
    }

    /// PUT `path` with the admin secret header.
    ///
    /// # Errors
    /// On transport failure or a non-2xx status.
    pub async fn put_admin(&self, path: &str, admin_secret: &str, body: Value) -> Result<Value> {
        self.admin(reqwest::Method::PUT, path, admin_secret, body)
            .await
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        admin_secret: &str,
        body: Value,
    ) -> Result<Value> {
        let req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("x-admin-secret", admin_secret)
            .json(&body);
        ok_json(
            req.send()
                .await
                .map_err(transport(format!("{method} {path}")))?,
        )
        .await
    }

    /// Registers a device and returns its id.
    ///
    /// # Errors
    /// On failure.
    pub async fn register_device(&self, device_type: &str) -> Result<i64> {
        let v = self
            .post(
                "/v1/devices",
                None,
                json!({"type": device_type, "brand": "zhibo", "model": "cli", "system_version": "1", "sdk_version": "1"}),
            )
            .await?;
        v["device_id"]
            .as_i64()
            .ok_or(ApiError::Missing("device_id"))
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
    ) -> Result<Credentials> {
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
            user_id: v["user_id"].as_i64().ok_or(ApiError::Missing("user_id"))?,
            device_id,
            token: v["token"]
                .as_str()
                .ok_or(ApiError::Missing("token"))?
                .to_owned(),
        })
    }
}

impl Api {
    /// The id of the user with exactly this username, `None` if there is none.
    ///
    /// # Errors
    /// On transport failure or a non-2xx status.
    pub async fn user_id_by_username(&self, token: &str, username: &str) -> Result<Option<i64>> {
        let url = format!("{}/v1/users/search", self.base);
        let req = self
            .http
            .get(url)
            .query(&[("username", username)])
            .bearer_auth(token);
        let v = ok_json(
            req.send()
                .await
                .map_err(transport("GET /v1/users/search".to_owned()))?,
        )
        .await?;
        Ok(v["users"]
            .as_array()
            .and_then(|users| users.first())
            .and_then(|u| u["user_id"].as_i64()))
    }
}
