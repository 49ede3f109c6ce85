//! Tenant key material.
//!
//! A tenant's key material is `blake3::derive_key("kframe tenant rotation v1",
//! master || tenant id || epoch)`. The master secret is 32 random bytes kept in a
//! 0600 file in the data directory. The tenant id has a variable length but sits
//! between two fixed-length fields, so the concatenation is unambiguous.

use crate::error::{Error, Result};
use rand::TryRngCore;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const TENANT_CONTEXT: &str = "kframe tenant rotation v1";
const FINGERPRINT_CONTEXT: &str = "kframe tenant key fingerprint v1";
pub const MASTER_SECRET_FILE: &str = "master.key";

/// The server-wide root of every tenant key. Zeroized when dropped.
pub struct MasterSecret(Zeroizing<[u8; 32]>);

impl MasterSecret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn random() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.try_fill_bytes(bytes.as_mut()).expect("the operating system's random source failed");
        Self(bytes)
    }

    /// A 32-byte key for one purpose (`context`), derived from the master secret.
    pub fn derive(&self, context: &str) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(blake3::derive_key(context, self.0.as_ref()))
    }

    /// Reads `DIR/master.key`, creating it (mode 0600) with fresh random bytes on
    /// first start. A file that others can read is refused rather than used.
    pub fn load_or_create(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(MASTER_SECRET_FILE);
        let err = |reason: String| Error::Secret { path: path.clone(), reason };
        std::fs::create_dir_all(data_dir).map_err(|e| err(format!("creating the data directory: {e}")))?;
        match std::fs::read(&path) {
            Ok(bytes) => {
                check_private(&path).map_err(err)?;
                let bytes = Zeroizing::new(bytes);
                let arr: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| err(format!("expected 32 bytes, found {}", bytes.len())))?;
                Ok(Self::from_bytes(arr))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = Self::random();
                write_private(&path, secret.0.as_ref()).map_err(|e| err(e.to_string()))?;
                Ok(secret)
            }
            Err(e) => Err(err(e.to_string())),
        }
    }
}

/// Refuses a secret file that anyone but its owner can read (mode & 0o077).
#[cfg(unix)]
pub fn check_private(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_err(|e| e.to_string())?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!("mode {:o} lets others read it; run chmod 600", mode & 0o777));
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn check_private(_: &Path) -> std::result::Result<(), String> {
    Ok(())
}

/// Creates `path` (it must not exist) with mode 0600 and writes `bytes`, synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Which cached tensor a rotation applies to: R rotates K, S rotates V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Which {
    K,
    V,
}

/// One tenant's key material for one epoch. Zeroized when dropped.
pub struct TenantKey {
    tenant: String,
    epoch: u64,
    material: Zeroizing<[u8; 32]>,
}

impl TenantKey {
    pub fn derive(master: &MasterSecret, tenant: &str, epoch: u64) -> Self {
        let mut input = Zeroizing::new(Vec::with_capacity(32 + tenant.len() + 8));
        input.extend_from_slice(master.0.as_ref());
        input.extend_from_slice(tenant.as_bytes());
        input.extend_from_slice(&epoch.to_le_bytes());
        let material = Zeroizing::new(blake3::derive_key(TENANT_CONTEXT, &input));
        Self { tenant: tenant.to_owned(), epoch, material }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A public identifier of this key (safe to use as a map key or log): it
    /// reveals nothing about the material.
    pub fn fingerprint(&self) -> [u8; 32] {
        blake3::derive_key(FINGERPRINT_CONTEXT, self.material.as_ref())
    }

    /// The RNG seed of the rotation for one (layer, kv head, K or V).
    pub fn matrix_seed(&self, layer: usize, head: usize, which: Which) -> Zeroizing<[u8; 32]> {
        let mut data = [0u8; 9];
        data[..4].copy_from_slice(&(layer as u32).to_le_bytes());
        data[4..8].copy_from_slice(&(head as u32).to_le_bytes());
        data[8] = match which {
            Which::K => b'K',
            Which::V => b'V',
        };
        Zeroizing::new(*blake3::keyed_hash(&self.material, &data).as_bytes())
    }

    /// The PRF key of the norm pads for one (layer, kv head, K or V) (see
    /// [`crate::layout`]); distinct from every matrix seed.
    pub fn pad_seed(&self, layer: usize, head: usize, which: Which) -> Zeroizing<[u8; 32]> {
        let mut data = [0u8; 10];
        data[..4].copy_from_slice(&(layer as u32).to_le_bytes());
        data[4..8].copy_from_slice(&(head as u32).to_le_bytes());
        data[8] = b'P';
        data[9] = match which {
            Which::K => b'K',
            Which::V => b'V',
        };
        Zeroizing::new(*blake3::keyed_hash(&self.material, &data).as_bytes())
    }
}

/// The default data directory: `$KFRAME_DATA_DIR`, else `~/.local/share/kframe`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KFRAME_DATA_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/kframe")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_secret_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = MasterSecret::load_or_create(dir.path()).unwrap();
        let b = MasterSecret::load_or_create(dir.path()).unwrap();
        assert_eq!(a.0.as_ref(), b.0.as_ref());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(MASTER_SECRET_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_master_secret_readable_by_others_or_of_wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MASTER_SECRET_FILE);
        std::fs::write(&path, [7u8; 31]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = MasterSecret::load_or_create(dir.path()).err().unwrap().to_string();
            assert!(err.contains("32 bytes"), "{err}");
            std::fs::write(&path, [7u8; 32]).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = MasterSecret::load_or_create(dir.path()).err().unwrap().to_string();
            assert!(err.contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn key_material_depends_on_secret_tenant_and_epoch() {
        let m = MasterSecret::from_bytes([1; 32]);
        let base = TenantKey::derive(&m, "alice", 0).fingerprint();
        assert_eq!(base, TenantKey::derive(&m, "alice", 0).fingerprint());
        assert_ne!(base, TenantKey::derive(&m, "alice", 1).fingerprint());
        assert_ne!(base, TenantKey::derive(&m, "bob", 0).fingerprint());
        assert_ne!(base, TenantKey::derive(&MasterSecret::from_bytes([2; 32]), "alice", 0).fingerprint());
        let k = TenantKey::derive(&m, "alice", 0);
        assert_ne!(*k.matrix_seed(0, 0, Which::K), *k.matrix_seed(0, 0, Which::V));
        assert_ne!(*k.matrix_seed(0, 0, Which::K), *k.matrix_seed(1, 0, Which::K));
        assert_ne!(*k.matrix_seed(0, 0, Which::K), *k.matrix_seed(0, 1, Which::K));
        assert_ne!(*k.matrix_seed(0, 0, Which::K), *k.pad_seed(0, 0, Which::K));
        assert_ne!(*k.pad_seed(0, 0, Which::K), *k.pad_seed(0, 0, Which::V));
    }
}
