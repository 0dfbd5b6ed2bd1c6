//! Files: what an account keeps to attach to its e-mails (an invoice, a
//! ticket), by name. Each backend keeps the bytes its own way — a JetStream
//! object store on NATS, the store on the embedded bus — behind [`Files`].
//!
//! What may be kept is decided here, before any backend sees it
//! ([`FilePolicy::check`]): a plain name (no path), a size under the
//! deployment's limit, and content whose type — sniffed from its first
//! bytes, not taken from the caller — is on the allow list.

use serde::{Deserialize, Serialize};
use switchboard_sdk::AccountKey;
use time::OffsetDateTime;

use super::RecordError;
pub use super::sha256_hex;

/// A file an account keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The account.
    pub account_key: AccountKey,
    /// Its name (`invoice-42.pdf`).
    pub name: String,
    /// Its type, as sniffed when it was put.
    pub content_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// The SHA-256 of its bytes, in hex.
    pub sha256: String,
    /// When it was put.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl FileInfo {
    /// The description of `bytes` kept as `name` of `account`, of type
    /// `content_type`, put now.
    pub fn of(account: &AccountKey, name: &str, content_type: &str, bytes: &[u8]) -> Self {
        Self {
            account_key: account.clone(),
            name: name.to_string(),
            content_type: content_type.to_string(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
            created_at: switchboard_sdk::now(),
        }
    }
}

/// File names: `^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`, without `..`: a name,
/// never a path.
pub fn check_file_name(name: &str) -> Result<(), String> {
    let plain = name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.contains("..");
    if plain {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a file name: use 1 to 128 of A-Z a-z 0-9 . _ - (starting with a \
             letter or digit, no `..`, no path)"
        ))
    }
}

/// The type of `bytes` (named `name`) by its first bytes: PDF, PNG, JPEG,
/// GIF, ZIP (and the office formats built on it), or text (valid UTF-8 with
/// no control characters but tabs and line ends: `text/csv` when named
/// `.csv`, else `text/plain`); `None` when it is none of them.
pub fn sniff(name: &str, bytes: &[u8]) -> Option<&'static str> {
    const MAGIC: [(&[u8], &str); 6] = [
        (b"%PDF-", "application/pdf"),
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"PK\x03\x04", "application/zip"),
    ];
    if let Some((_, t)) = MAGIC.iter().find(|(m, _)| bytes.starts_with(m)) {
        return Some(t);
    }
    let text = std::str::from_utf8(bytes).ok()?;
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return None;
    }
    Some(if name.to_ascii_lowercase().ends_with(".csv") {
        "text/csv"
    } else {
        "text/plain"
    })
}

/// The extensions a file of content type `t` may have.
fn extensions(t: &str) -> &'static [&'static str] {
    match t {
        "application/pdf" => &["pdf"],
        "image/png" => &["png"],
        "image/jpeg" => &["jpg", "jpeg"],
        "image/gif" => &["gif"],
        "application/zip" => &["zip", "docx", "xlsx", "pptx", "odt", "ods", "odp"],
        "text/csv" => &["csv"],
        "text/plain" => &["txt", "text", "log"],
        _ => &[],
    }
}

/// What the deployment lets accounts keep (`[files]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilePolicy {
    /// The largest file, in bytes.
    pub max_bytes: u64,
    /// The content types allowed (as [`sniff`] names them).
    pub allowed: Vec<String>,
}

impl Default for FilePolicy {
    fn default() -> Self {
        Self {
            max_bytes: 5 * 1024 * 1024,
            allowed: [
                "application/pdf",
                "image/png",
                "image/jpeg",
                "image/gif",
                "text/plain",
                "text/csv",
            ]
            .map(str::to_string)
            .to_vec(),
        }
    }
}

/// Why a file was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileRefused {
    /// The name is not a plain file name.
    #[error("{0}")]
    Name(String),
    /// Over the size limit.
    #[error(
        "{name:?} is {size} bytes, over this deployment's limit of {limit} bytes (`[files] \
         max_bytes`)"
    )]
    TooLarge {
        /// The name.
        name: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Its name's extension does not say what its content is.
    #[error("{name:?} is {what}: its name must end in one of {fits}")]
    Extension {
        /// The name.
        name: String,
        /// What it was sniffed as.
        what: &'static str,
        /// The extensions that fit.
        fits: String,
    },
    /// Its content is not an allowed type.
    #[error(
        "{name:?} is {what}, which this deployment does not keep (`[files] allowed`: {allowed})"
    )]
    Type {
        /// The name.
        name: String,
        /// What it was sniffed as.
        what: String,
        /// The allowed types.
        allowed: String,
    },
}

impl FilePolicy {
    /// Whether `bytes` may be kept as `name`: its content type if so.
    pub fn check(&self, name: &str, bytes: &[u8]) -> Result<&'static str, FileRefused> {
        check_file_name(name).map_err(FileRefused::Name)?;
        let size = bytes.len() as u64;
        if size > self.max_bytes {
            return Err(FileRefused::TooLarge {
                name: name.to_string(),
                size,
                limit: self.max_bytes,
            });
        }
        let sniffed = sniff(name, bytes);
        match sniffed {
            Some(t) if self.allowed.iter().any(|a| a == t) => {
                // Mail clients open attachments by their extension: it must
                // say what the content is.
                let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
                if extension.is_some_and(|e| extensions(t).contains(&e.as_str())) {
                    Ok(t)
                } else {
                    Err(FileRefused::Extension {
                        name: name.to_string(),
                        what: t,
                        fits: extensions(t).join(", "),
                    })
                }
            }
            _ => Err(FileRefused::Type {
                name: name.to_string(),
                what: sniffed.map_or("of a type not recognised".to_string(), |t| t.to_string()),
                allowed: self.allowed.join(", "),
            }),
        }
    }
}

/// Files of every account.
#[async_trait::async_trait]
pub trait Files: Send + Sync + std::fmt::Debug {
    /// Keeps `bytes` as `name` of `account` (replacing a file of that
    /// name), of type `content_type` ([`FilePolicy::check`] first).
    async fn put(
        &self,
        account: &AccountKey,
        name: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<FileInfo, RecordError>;

    /// The file `name` of `account` and its bytes.
    async fn get(
        &self,
        account: &AccountKey,
        name: &str,
    ) -> Result<Option<(FileInfo, Vec<u8>)>, RecordError>;

    /// The account's files, by name.
    async fn list(&self, account: &AccountKey) -> Result<Vec<FileInfo>, RecordError>;

    /// Removes the file `name` of `account`; whether it was there.
    async fn remove(&self, account: &AccountKey, name: &str) -> Result<bool, RecordError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_names_not_paths() {
        for ok in ["invoice-42.pdf", "a", "Report_2026.12.csv"] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "../etc/passwd",
            "a/b.pdf",
            ".hidden",
            "a..b",
            "naïve.txt",
            "a b",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_file_name(&"a".repeat(129)).is_err());
    }

    /// What `bytes` named `name` is taken for, or why it is refused.
    fn check(name: &str, bytes: &[u8], expected: Result<&str, &str>) {
        let policy = FilePolicy {
            max_bytes: 64,
            ..FilePolicy::default()
        };
        match (policy.check(name, bytes), expected) {
            (Ok(t), Ok(e)) => assert_eq!(t, e, "{name}"),
            (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{name}: {e}"),
            (got, _) => panic!("{name}: {got:?}"),
        }
    }

    #[test]
    fn content_is_sniffed_and_checked_against_the_allow_list() {
        check("i.pdf", b"%PDF-1.7\n...", Ok("application/pdf"));
        check("p.png", b"\x89PNG\r\n\x1a\n....", Ok("image/png"));
        check("j.jpg", b"\xff\xd8\xff\xe0..", Ok("image/jpeg"));
        check("notes.txt", "héllo\nthere\t!".as_bytes(), Ok("text/plain"));
        check("rows.CSV", b"a,b\n1,2\n", Ok("text/csv"));
        // The name does not decide the type: a program called .pdf is not one.
        check(
            "i.pdf",
            b"\x7fELF\x02\x01\x01",
            Err("of a type not recognised"),
        );
        check(
            "a.zip",
            b"PK\x03\x04....",
            Err("is application/zip, which this deployment does not keep"),
        );
        check(
            "big.txt",
            &[b'a'; 65],
            Err("65 bytes, over this deployment's limit of 64"),
        );
        check("../x.txt", b"x", Err("is not a file name"));
        // Nor does the content decide the name: text called .html, a PDF
        // called .exe, a file with no extension.
        check(
            "page.html",
            b"<script>alert(1)</script>",
            Err("is text/plain: its name must end in one of txt, text, log"),
        );
        check(
            "i.exe",
            b"%PDF-1.7\n",
            Err("is application/pdf: its name must end in one of pdf"),
        );
        check("README", b"hello", Err("its name must end in one of"));
        check("photo.JPEG", b"\xff\xd8\xff\xe0..", Ok("image/jpeg"));
    }
}
