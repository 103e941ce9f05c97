//! Secrets and the cryptography around them: generation from the OS CSPRNG
//! under a per-target policy, keyed fingerprints (the only form of a secret
//! that may leave a worker), and the AEAD (XChaCha20-Poly1305) that seals
//! values in a region's secret store with the region key.

use base64::Engine;
use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    XChaCha20Poly1305, XNonce,
};
use hmac::{Hmac, Mac};
use rand::{rngs::OsRng, RngCore};
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret value. It cannot be printed: `Debug` is redacted and there is no
/// `Display`; the memory is wiped on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    /// The clear value, for handing to a target driver. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Characters a generated secret may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Charset {
    /// `A-Z a-z 0-9`: safe in URLs, connection strings and shells.
    Alphanumeric,
    /// Alphanumeric plus `-_.~!#%^*+=`: no quotes, backslashes or spaces.
    AlphanumericSymbols,
    /// Lower-case hex.
    Hex,
}

impl Charset {
    fn alphabet(self) -> &'static [u8] {
        match self {
            Charset::Alphanumeric => {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
            }
            Charset::AlphanumericSymbols => {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~!#%^*+="
            }
            Charset::Hex => b"0123456789abcdef",
        }
    }
}

/// What a target accepts as a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretPolicy {
    pub length: usize,
    pub charset: Charset,
}

impl Default for SecretPolicy {
    fn default() -> Self {
        SecretPolicy {
            length: 40,
            charset: Charset::Alphanumeric,
        }
    }
}

/// Generates a secret: each character drawn uniformly from the policy's
/// alphabet with the OS CSPRNG.
pub fn generate(policy: &SecretPolicy) -> Secret {
    let alphabet = policy.charset.alphabet();
    let len = policy.length.max(16);
    // Random bytes come from the OS in blocks (one system call per block,
    // not per character) and are mapped by rejection sampling: a byte is
    // used only below the largest multiple of the alphabet size, so every
    // character is exactly uniform.
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(len);
    let mut block = [0u8; 128];
    while out.len() < len {
        OsRng.fill_bytes(&mut block);
        for &b in &block {
            if (b as usize) < limit {
                out.push(alphabet[b as usize % alphabet.len()] as char);
                if out.len() == len {
                    break;
                }
            }
        }
    }
    block.zeroize();
    Secret(out)
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    #[error("region key must be 32 bytes, given as 64 hex characters or base64 ({0})")]
    BadKey(String),
    #[error("region key file {path}: {detail}")]
    KeyFile { path: String, detail: String },
    #[error("sealed value is truncated")]
    Truncated,
    #[error("sealed value failed authentication (wrong region key or tampered value)")]
    Unauthentic,
}

/// A region's 256-bit key. Only that region's workers and agents hold it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct RegionKey([u8; 32]);

impl std::fmt::Debug for RegionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegionKey(<redacted>)")
    }
}

const NONCE_LEN: usize = 24;

impl RegionKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        RegionKey(b)
    }

    /// A fresh random key (for `keywave dev`, tests and `keygen`).
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        RegionKey(b)
    }

    /// Parses 64 hex characters or standard base64 of 32 bytes.
    pub fn parse(s: &str) -> Result<Self, CryptoError> {
        let s = s.trim();
        let bytes = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(s).map_err(|e| CryptoError::BadKey(e.to_string()))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|_| CryptoError::BadKey("neither hex nor base64".into()))?
        };
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|v: Vec<u8>| CryptoError::BadKey(format!("decoded to {} bytes", v.len())))?;
        Ok(RegionKey(arr))
    }

    /// Reads a key file (hex or base64, surrounding whitespace ignored).
    pub fn from_file(path: &std::path::Path) -> Result<Self, CryptoError> {
        let s = std::fs::read_to_string(path).map_err(|e| CryptoError::KeyFile {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&s)
    }

    /// Hex form, for writing a generated key to a file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn subkey(&self, label: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// Encrypts `plaintext`, binding it to `aad` (bucket and key name), so a
    /// sealed value copied to another credential does not open.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&self.subkey(b"keywave/store/v1")).into());
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts a value sealed by [`RegionKey::seal`] with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Truncated);
        }
        let cipher = XChaCha20Poly1305::new((&self.subkey(b"keywave/store/v1")).into());
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| CryptoError::Unauthentic)
    }

    /// The keyed fingerprint of a secret: `fp1:` and 32 hex characters of
    /// HMAC-SHA256 under a key derived from the region key. It identifies a
    /// secret in results and reports without revealing it, and cannot be
    /// brute-forced by anyone without the region key.
    pub fn fingerprint(&self, secret: &Secret) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.subkey(b"keywave/fingerprint/v1"))
                .expect("any key length");
        mac.update(secret.expose().as_bytes());
        let out = mac.finalize().into_bytes();
        format!("fp1:{}", hex::encode(&out[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_follow_policy() {
        let p = SecretPolicy {
            length: 32,
            charset: Charset::Hex,
        };
        let s = generate(&p);
        assert_eq!(s.expose().len(), 32);
        assert!(s.expose().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(generate(&p), s);
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn every_charset_and_length_is_honoured() {
        for charset in [
            Charset::Alphanumeric,
            Charset::AlphanumericSymbols,
            Charset::Hex,
        ] {
            for length in [16, 17, 129, 300] {
                let s = generate(&SecretPolicy { length, charset });
                assert_eq!(s.expose().len(), length);
                assert!(s.expose().bytes().all(|b| charset.alphabet().contains(&b)));
            }
        }
        // Short policies are raised to 16 characters.
        let s = generate(&SecretPolicy {
            length: 4,
            charset: Charset::Hex,
        });
        assert_eq!(s.expose().len(), 16);
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let k = RegionKey::generate();
        let sealed = k.seal(b"cred-a", b"hello");
        assert_eq!(k.open(b"cred-a", &sealed).unwrap(), b"hello");
        assert_eq!(k.open(b"cred-b", &sealed), Err(CryptoError::Unauthentic));
        assert_eq!(
            RegionKey::generate().open(b"cred-a", &sealed),
            Err(CryptoError::Unauthentic)
        );
        assert_eq!(
            k.open(b"cred-a", &sealed[..10]),
            Err(CryptoError::Truncated)
        );
    }

    #[test]
    fn key_parsing() {
        let k = RegionKey::generate();
        let again = RegionKey::parse(&k.to_hex()).unwrap();
        let s = Secret::new("x".into());
        assert_eq!(k.fingerprint(&s), again.fingerprint(&s));
        assert!(RegionKey::parse("abcd").is_err());
        assert_ne!(
            k.fingerprint(&s),
            RegionKey::generate().fingerprint(&s),
            "fingerprints are keyed"
        );
    }
}
