//! TEMPORARY stand-in with the agreed API (memory only); replaced by the real store on merge.
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::config::Secret;

#[derive(Clone)]
pub struct TokenEntry {
    pub sub: String,
    pub server: String,
    pub kind: String,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: Option<u64>,
    pub updated_at: u64,
    pub secret: Secret,
}

#[derive(Clone, Serialize, Deserialize, Debug)]
pub struct TokenSummary {
    pub sub: String,
    pub server: String,
}

#[derive(Debug, thiserror::Error)]
#[error("token store: {0}")]
pub struct StoreError(String);

#[derive(Default)]
pub struct TokenStore {
    m: DashMap<(String, String), TokenEntry>,
}

impl TokenStore {
    pub fn memory() -> Self {
        Self::default()
    }
    pub async fn get(&self, sub: &str, server: &str) -> Result<Option<TokenEntry>, StoreError> {
        Ok(self.m.get(&(sub.into(), server.into())).map(|e| e.clone()))
    }
    pub async fn put(&self, entry: TokenEntry) -> Result<(), StoreError> {
        self.m
            .insert((entry.sub.clone(), entry.server.clone()), entry);
        Ok(())
    }
    pub async fn remove(
        &self,
        sub: Option<&str>,
        server: Option<&str>,
    ) -> Result<Vec<TokenSummary>, StoreError> {
        let mut out = Vec::new();
        self.m.retain(|(s, v), _| {
            let hit = sub.is_none_or(|x| x == s) && server.is_none_or(|x| x == v);
            if hit {
                out.push(TokenSummary {
                    sub: s.clone(),
                    server: v.clone(),
                });
            }
            !hit
        });
        Ok(out)
    }
}
