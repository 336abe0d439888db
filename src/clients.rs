//! Client identities: the registry of named client keys every connection
//! checks requests against (README "For sandbox runners").
//!
//! Only SHA-256 digests of the keys are stored. A lookup digests the
//! presented key and compares it with every registered digest without an
//! early exit, so its time does not depend on which keys exist or on how
//! much of one matched; only on how many are registered.

use std::sync::{Arc, PoisonError, RwLock};

use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

use crate::budget::{Budget, ClientLimits, Usage};
use crate::config::Secret;
use crate::error::Error;
use crate::route::constant_time_eq;

/// A registered client: its name, the digest of its key, its budget.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) name: Arc<str>,
    digest: [u8; 32],
    budget: Arc<Budget>,
    /// Registered by the clients file, so a reload may revoke it.
    from_file: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The registry; shared by every connection, changed at runtime.
#[derive(Debug)]
pub(crate) struct Clients {
    /// Requests must carry a registered key (even while none is).
    pub(crate) required: bool,
    /// The limits of clients registered without their own.
    defaults: ClientLimits,
    /// The budget unidentified requests share, when keys are not required
    /// and limits are set.
    pub(crate) anonymous: Option<Arc<Budget>>,
    entries: RwLock<Vec<Client>>,
}

impl Clients {
    /// An empty registry; `defaults` applies to clients without limits of
    /// their own (and, when keys are not required, to all requests).
    pub(crate) fn new(required: bool, defaults: ClientLimits) -> Clients {
        let limited = defaults != ClientLimits::default();
        Clients {
            required,
            defaults,
            anonymous: (!required && limited).then(|| Arc::new(Budget::new("-".into(), defaults))),
            entries: RwLock::new(Vec::new()),
        }
    }

    /// The budget (and name) of the client whose key this is.
    pub(crate) fn lookup(&self, key: &[u8]) -> Option<Arc<Budget>> {
        let presented = sha256(key);
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        // A fold visits every entry: each digest is compared, no early exit.
        let found = (entries.iter()).filter(|c| constant_time_eq(&c.digest, &presented));
        found.fold(None, |_, c| Some(c.budget.clone()))
    }

    /// What the client `name` (`-`: unidentified requests) has used.
    pub(crate) fn usage(&self, name: &str) -> Option<Usage> {
        if name == "-" {
            return self.anonymous.as_ref().map(|b| b.usage());
        }
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let client = entries.iter().find(|c| &*c.name == name)?;
        Some(client.budget.usage())
    }

    /// Registers `name` with `key` and `limits` (the defaults if `None`);
    /// fails if either is taken or invalid.
    pub(crate) fn add(
        &self,
        name: &str,
        key: &Secret,
        limits: Option<ClientLimits>,
    ) -> Result<(), Error> {
        let client = entry(name, key, limits.unwrap_or(self.defaults), false)?;
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        check_unique(&entries, &client)?;
        entries.push(client);
        Ok(())
    }

    /// Revokes `name`: once this returns, no lookup finds its key.
    pub(crate) fn remove(&self, name: &str) -> bool {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        // Names are unique (`check_unique`): there is at most one.
        let index = entries.iter().position(|c| &*c.name == name);
        index.map(|i| entries.remove(i)).is_some()
    }

    /// Replaces every client the clients file registered with `fresh` (a
    /// file read by `read_clients_file`); nothing changes if a name or key
    /// clashes with a client registered otherwise.
    pub(crate) fn replace_file_clients(&self, fresh: Vec<Client>) -> Result<(), Error> {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        let mut next: Vec<Client> = entries.iter().filter(|c| !c.from_file).cloned().collect();
        for mut client in fresh {
            check_unique(&next, &client)?;
            // A client still listed keeps what it has spent.
            let same =
                |c: &&Client| c.from_file && c.name == client.name && c.digest == client.digest;
            client.budget = match entries.iter().find(same) {
                Some(kept) => kept.budget.clone(),
                None => Arc::new(Budget::new(client.name.clone(), self.defaults)),
            };
            next.push(client);
        }
        *entries = next;
        Ok(())
    }
}

/// Reads a clients file: one client per line, `NAME KEY` separated by
/// spaces or tabs (KEY is the rest of the line without surrounding
/// whitespace, taken literally); empty lines and lines starting with `#`
/// are skipped. Errors name the file and line, never a key.
pub(crate) fn read_clients_file(path: &str) -> Result<Vec<Client>, Error> {
    let fail = |line: usize, why| Error::ClientsFile(path.to_owned(), line, why);
    let bytes =
        zeroize::Zeroizing::new(std::fs::read(path).map_err(|_| fail(0, "cannot be read"))?);
    let text = std::str::from_utf8(&bytes).map_err(|_| fail(0, "is not UTF-8"))?;
    let mut clients: Vec<Client> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_matches([' ', '\t', '\r']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, key) =
            (line.split_once([' ', '\t'])).ok_or_else(|| fail(i + 1, "expected NAME KEY"))?;
        let key = Secret::new(key.trim_matches([' ', '\t']));
        // The budget is set by `replace_file_clients`, which knows the defaults.
        let client = entry(name, &key, ClientLimits::default(), true).map_err(|err| match err {
            Error::BadClientName => fail(i + 1, "bad client name"),
            _ => fail(i + 1, "bad key (empty or a control byte)"),
        })?;
        check_unique(&clients, &client).map_err(|_| fail(i + 1, "duplicate name or key"))?;
        clients.push(client);
    }
    Ok(clients)
}

/// A client entry for `name` and `key` with a fresh budget under `limits`,
/// all three validated.
fn entry(name: &str, key: &Secret, limits: ClientLimits, from_file: bool) -> Result<Client, Error> {
    limits.validate()?;
    let valid_name = (1..=64).contains(&name.len())
        && (name.bytes()).all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid_name {
        return Err(Error::BadClientName);
    }
    crate::config::check_value(key, &format!("client {name}"))?;
    let name: Arc<str> = name.into();
    Ok(Client {
        budget: Arc::new(Budget::new(name.clone(), limits)),
        name,
        digest: sha256(key.expose()),
        from_file,
    })
}

fn check_unique(entries: &[Client], client: &Client) -> Result<(), Error> {
    for other in entries {
        if other.name == client.name {
            return Err(Error::DuplicateClient(client.name.to_string()));
        }
        if other.digest == client.digest {
            return Err(Error::DuplicateClientKey(client.name.to_string()));
        }
    }
    Ok(())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// A fresh client key: `kh_` and 43 base64url characters, 256 bits from the
/// operating system's generator.
pub(crate) fn generate_key() -> Result<Secret, Error> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    (SystemRandom::new().fill(bytes.as_mut())).map_err(|_| Error::Random)?;
    let mut text = String::with_capacity(3 + 43);
    text.push_str("kh_");
    base64(bytes.as_ref(), BASE64URL, false, &mut text);
    Ok(Secret::new(text))
}

/// The URL-safe base64 alphabet (RFC 4648 §5).
pub(crate) const BASE64URL: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Appends `bytes` in base64 with `alphabet` (RFC 4648 §4, §5), with `=`
/// padding if `pad`. `out` must have room: it holds secrets.
pub(crate) fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool, out: &mut String) {
    for group in bytes.chunks(3) {
        let n = (group.iter().enumerate()).fold(0, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(alphabet[(n >> (18 - 6 * i)) as usize & 63]));
            } else if pad {
                out.push('=');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_only_registered_keys() {
        let clients = Clients::new(true, ClientLimits::default());
        clients.add("a", &Secret::new("key-a"), None).unwrap();
        clients.add("b", &Secret::new("key-b"), None).unwrap();
        assert_eq!(
            clients.lookup(b"key-a").map(|b| b.name.clone()).as_deref(),
            Some("a")
        );
        assert_eq!(
            clients.lookup(b"key-b").map(|b| b.name.clone()).as_deref(),
            Some("b")
        );
        assert!(clients.lookup(b"key-").is_none());
        assert!(clients.lookup(b"").is_none());
        assert!(clients.remove("a"));
        assert!(!clients.remove("a"));
        assert!(clients.lookup(b"key-a").is_none());
        assert_eq!(
            clients.lookup(b"key-b").map(|b| b.name.clone()).as_deref(),
            Some("b")
        );
    }

    #[test]
    fn names_and_keys_are_unique_and_valid() {
        let clients = Clients::new(true, ClientLimits::default());
        clients.add("a", &Secret::new("k1"), None).unwrap();
        assert!(matches!(
            clients.add("a", &Secret::new("k2"), None),
            Err(Error::DuplicateClient(_))
        ));
        assert!(matches!(
            clients.add("b", &Secret::new("k1"), None),
            Err(Error::DuplicateClientKey(_))
        ));
        for bad in ["", "a b", "é", &"x".repeat(65)] {
            assert!(matches!(
                clients.add(bad, &Secret::new("k3"), None),
                Err(Error::BadClientName)
            ));
        }
        assert!(clients
            .add(&"x".repeat(64), &Secret::new("k3"), None)
            .is_ok());
        assert!(clients.add("c", &Secret::new(""), None).is_err());
        assert!(clients.add("c", &Secret::new("a\nb"), None).is_err());
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        let text = std::str::from_utf8(a.expose()).unwrap();
        assert_eq!(text.len(), 46);
        assert!(text.starts_with("kh_"));
        assert!(text[3..].bytes().all(|c| BASE64URL.contains(&c)));
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = String::new();
            base64(input.as_bytes(), STD, true, &mut out);
            assert_eq!(out, want);
        }
        let mut out = String::new();
        base64(&[0xfb, 0xff], BASE64URL, false, &mut out);
        assert_eq!(out, "-_8");
    }
}
