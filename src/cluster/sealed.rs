//! Values sealed with `[cluster] secret_key`, so any instance opens what another wrote and Redis
//! never holds them in clear.
//!
//! AES-256-GCM with a key derived from the secret by SHA-256 over a purpose label (the same secret
//! also keys `requestState`, under another label, so neither key can stand in for the other). The
//! associated data binds a value to where it is stored (its Redis key name): a value copied under
//! another key does not open. Text form, base64url without padding:
//! `version (1 byte) ‖ nonce (12 bytes, random per seal) ‖ ciphertext ‖ tag (16 bytes)`.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// The first byte of every sealed value; a new format gets a new number.
const VERSION: u8 = 1;
/// What the encryption key is for (hashed in front of the secret).
const PURPOSE: &[u8] = b"mcp-broker sealed v1\0";
/// GCM's tag.
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("no OS random source: {0}")]
    Random(#[from] getrandom::Error),
    /// Not base64url, too short, an unknown version, or the tag does not verify (tampered, sealed
    /// with another secret, or stored under another name). Deliberately one case: which one it was
    /// is of no use to whoever forged it.
    #[error("the sealed value does not open")]
    Unopenable,
}

/// Seals and opens values with the cluster's key. Holds the derived key only, never the secret.
pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    pub fn new(secret: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(PURPOSE)
            .chain_update(secret.as_bytes())
            .finalize();
        // A 32-byte key is exactly what AES-256 takes, so this cannot fail.
        let key = UnboundKey::new(&AES_256_GCM, &digest)
            .map(LessSafeKey::new)
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes a 32-byte key"));
        Self { key }
    }

    /// `plaintext` encrypted and authenticated, bound to `aad` (where it will be stored).
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| SealError::Unopenable)?;
        out.extend_from_slice(&body);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// The plaintext sealed by [`Self::seal`] with the same secret and the same `aad`.
    pub fn open(&self, aad: &[u8], text: &str) -> Result<Vec<u8>, SealError> {
        let raw = URL_SAFE_NO_PAD
            .decode(text.as_bytes())
            .map_err(|_| SealError::Unopenable)?;
        if raw.len() < 1 + NONCE_LEN + TAG_LEN || raw[0] != VERSION {
            return Err(SealError::Unopenable);
        }
        let nonce: [u8; NONCE_LEN] = raw[1..1 + NONCE_LEN]
            .try_into()
            .map_err(|_| SealError::Unopenable)?;
        let mut body = raw[1 + NONCE_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| SealError::Unopenable)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-cluster";
    const AAD: &[u8] = b"mcpb:cred:abc";

    #[test]
    fn round_trip() {
        let s = Sealer::new(SECRET);
        let text = s.seal(AAD, b"exchanged-token-value").unwrap();
        assert_eq!(s.open(AAD, &text).unwrap(), b"exchanged-token-value");
        // Another instance with the same secret opens it too.
        assert_eq!(
            Sealer::new(SECRET).open(AAD, &text).unwrap(),
            b"exchanged-token-value"
        );
        assert_eq!(s.open(AAD, &s.seal(AAD, b"").unwrap()).unwrap(), b"");
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let s = Sealer::new(SECRET);
        let text = s.seal(AAD, b"exchanged-token-value").unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            assert!(
                s.open(AAD, &URL_SAFE_NO_PAD.encode(&bad)).is_err(),
                "byte {i} flipped still opens"
            );
        }
        assert!(s.open(AAD, &text[..text.len() - 2]).is_err(), "truncated");
        assert!(s.open(AAD, "not base64 !").is_err());
        assert!(s.open(AAD, "").is_err());
    }

    #[test]
    fn bound_to_its_name() {
        let s = Sealer::new(SECRET);
        let text = s.seal(AAD, b"v").unwrap();
        assert!(s.open(b"mcpb:cred:abd", &text).is_err());
        assert!(s.open(b"", &text).is_err());
    }

    #[test]
    fn another_secret_does_not_open() {
        let text = Sealer::new(SECRET).seal(AAD, b"v").unwrap();
        assert!(
            Sealer::new("another-secret-another-secret-another")
                .open(AAD, &text)
                .is_err()
        );
    }

    #[test]
    fn no_plaintext_in_the_output_and_fresh_nonces() {
        let s = Sealer::new(SECRET);
        let plain = b"eyJhbGciOiJSUzI1NiJ9.secret-token-text";
        let a = s.seal(AAD, plain).unwrap();
        let b = s.seal(AAD, plain).unwrap();
        assert_ne!(a, b, "same plaintext, same text: the nonce is not fresh");
        for text in [&a, &b] {
            for w in plain.windows(6) {
                let w = std::str::from_utf8(w).unwrap();
                assert!(!text.contains(w), "`{w}` shows in the sealed text");
            }
            let raw = URL_SAFE_NO_PAD.decode(text).unwrap();
            assert!(!raw.windows(6).any(|w| plain.windows(6).any(|p| p == w)));
            assert_eq!(raw[0], VERSION);
            assert_eq!(raw.len(), 1 + NONCE_LEN + plain.len() + TAG_LEN);
        }
    }
}
