//! Console sessions: an API token exchanged at sign-in for a random session
//! id in an HttpOnly, SameSite=Strict cookie, with a CSRF token every
//! state-changing form carries. Sessions are kept in the store (shared by
//! replicas) under the SHA-256 of their id, so a restart or another replica
//! keeps a browser signed in (and its live tail reconnects); no token or
//! session id is ever stored or logged.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use switchboard_sdk::AccountKey;
use switchboard_store::{Collection, Store};

use crate::auth::{Credential, Principal};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "sb_session";
/// The cookie the sign-in form's CSRF token is checked against (the form
/// has no session yet: the token is submitted twice, in the cookie and the
/// form, and a page of another origin can set neither).
pub const SIGN_IN_COOKIE: &str = "sb_sign_in";
/// How long a session lasts from sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; expired ones are dropped first, then the oldest.
const MAX_SESSIONS: usize = 10_000;
/// Sessions one principal (an account, or the admin) keeps in the store
/// from the sign-ins of one process at most: a further sign-in signs its
/// oldest one out, so that a token signing in over and over cannot fill
/// the store (shared by replicas) for the sessions' twelve hours.
const MAX_SESSIONS_PER_PRINCIPAL: usize = 100;

/// A signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Whom the token resolved to.
    pub principal: Principal,
    /// The token every form of this session carries.
    pub csrf: String,
    /// The token it was started with, as its hash: the session lasts only
    /// while that token does.
    pub credential: Credential,
    expires: Instant,
    /// Whether the store keeps it: then it lasts only while the store
    /// does (signed out on another replica, it is removed there).
    kept: bool,
}

/// How long a sign-in link works, once.
pub const LINK_TTL: Duration = Duration::from_secs(600);

/// A session as the store keeps it.
#[derive(Serialize, Deserialize)]
struct Stored {
    /// `admin`, or the account.
    account: Option<AccountKey>,
    csrf: String,
    /// The token's hash, hex.
    credential: String,
    expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A session id's key in the store: its SHA-256, never the id.
fn stored_key(id: &str) -> Vec<u8> {
    Sha256::digest(id.as_bytes()).to_vec()
}

/// How often expired sessions are swept from the store (at a sign-in).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// The sessions a process kept in the store, by principal (`None`: the
/// admin), oldest first: their keys and when they expire.
type KeptSessions = HashMap<Option<AccountKey>, VecDeque<(Vec<u8>, Instant)>>;

/// The console's sessions, by id (the store's, with the ones this process
/// has read in memory), and the sign-in links not used yet.
#[derive(Debug)]
pub struct Sessions {
    store: Option<Store>,
    /// The console is reached over https (`http.public_url`): cookies are
    /// `Secure`.
    secure: bool,
    by_id: Mutex<HashMap<String, Session>>,
    /// The most sessions `by_id` holds ([`MAX_SESSIONS`]).
    most: usize,
    /// The sessions this process kept in the store, by principal.
    kept: Mutex<KeptSessions>,
    /// The most sessions `kept` holds of one principal
    /// ([`MAX_SESSIONS_PER_PRINCIPAL`]).
    most_each: usize,
    links: Mutex<HashMap<String, (Principal, Credential, Instant)>>,
    swept: Mutex<Option<Instant>>,
}

impl Default for Sessions {
    /// Sessions in memory only.
    fn default() -> Self {
        Self {
            store: None,
            secure: false,
            by_id: Mutex::default(),
            most: MAX_SESSIONS,
            kept: Mutex::default(),
            most_each: MAX_SESSIONS_PER_PRINCIPAL,
            links: Mutex::default(),
            swept: Mutex::default(),
        }
    }
}

impl Sessions {
    /// Sessions kept in `store` too.
    pub fn new(store: Store) -> Self {
        Self {
            store: Some(store),
            ..Self::default()
        }
    }

    /// Marks the cookies `Secure`: the console is reached over https.
    pub fn secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// Adds the console's cookie `name` to `response` (see [`set_cookie`]).
    pub fn set_cookie(&self, response: &mut Response, name: &str, value: &str, max_age: Duration) {
        set_cookie(response, name, value, max_age, self.secure);
    }

    /// Keeps `session` in the store; whether it did.
    fn save(&self, id: &str, session: &Session) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        let account = match &session.principal {
            Principal::Admin => None,
            Principal::Account(a) => Some(a.clone()),
            // Receiver tokens do not sign in to the console.
            Principal::Receiver(_) => return false,
        };
        let stored = Stored {
            account,
            csrf: session.csrf.clone(),
            credential: switchboard_handlers::records::hex(&session.credential),
            expires_ms: now_ms()
                + session
                    .expires
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
        };
        let value = serde_json::to_vec(&stored).expect("a session serialises");
        let principal = stored.account;
        let signed_out = self.make_room(&principal, id, session.expires);
        // Made durable at once: a sign-in is rare, and a crash right after
        // it should not sign the browser out.
        let written = signed_out
            .iter()
            .try_for_each(|key| store.remove(Collection::ConsoleSessions, key).map(drop))
            .and_then(|()| store.put(Collection::ConsoleSessions, &stored_key(id), &value))
            .and_then(|()| store.flush_blocking());
        let kept = match written {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "keeping a console session failed; it lasts until this process stops");
                false
            }
        };
        self.sweep(store);
        kept
    }

    /// Notes that this process keeps session `id` of `principal` (which
    /// expires at `expires`) in the store, and returns the keys of its
    /// oldest sessions to remove so that it keeps at most
    /// [`MAX_SESSIONS_PER_PRINCIPAL`] (expired ones are forgotten first).
    fn make_room(
        &self,
        principal: &Option<AccountKey>,
        id: &str,
        expires: Instant,
    ) -> Vec<Vec<u8>> {
        let mut kept = self.kept.lock().expect("kept sessions lock");
        let now = Instant::now();
        kept.retain(|_, sessions| {
            sessions.retain(|(_, until)| *until > now);
            !sessions.is_empty()
        });
        let sessions = kept.entry(principal.clone()).or_default();
        sessions.push_back((stored_key(id), expires));
        let over = sessions.len().saturating_sub(self.most_each);
        sessions.drain(..over).map(|(key, _)| key).collect()
    }

    fn load(&self, id: &str) -> Option<Session> {
        let store = self.store.as_ref()?;
        let bytes = store
            .get(Collection::ConsoleSessions, &stored_key(id))
            .ok()??;
        let stored: Stored = serde_json::from_slice(&bytes).ok()?;
        let left = stored.expires_ms.checked_sub(now_ms())?;
        let credential = switchboard_handlers::records::unhex32(&stored.credential)?;
        Some(Session {
            principal: match stored.account {
                None => Principal::Admin,
                Some(a) => Principal::Account(a),
            },
            csrf: stored.csrf,
            credential,
            expires: Instant::now() + Duration::from_millis(left),
            kept: true,
        })
    }

    /// Removes expired sessions from the store, at most once per
    /// [`SWEEP_EVERY`].
    fn sweep(&self, store: &Store) {
        {
            let mut swept = self.swept.lock().expect("sweep lock");
            if swept.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
                return;
            }
            *swept = Some(Instant::now());
        }
        let now = now_ms();
        let Ok(all) = store.scan_prefix(Collection::ConsoleSessions, &[]) else {
            return;
        };
        for (k, v) in all {
            let expired =
                serde_json::from_slice::<Stored>(&v).map_or(true, |s| s.expires_ms <= now);
            if expired {
                let _ = store.remove(Collection::ConsoleSessions, &k);
            }
        }
    }

    /// A code that signs a browser in as `principal` once, within
    /// [`LINK_TTL`] (`/console/sign-in/{code}`): what `switchboard demo`
    /// prints, so that its user needs no token to paste.
    pub fn sign_in_link(&self, principal: Principal, credential: Credential) -> String {
        let code = random_token();
        let mut links = self.links.lock().expect("link lock");
        let now = Instant::now();
        links.retain(|_, (_, _, expires)| *expires > now);
        links.insert(code.clone(), (principal, credential, now + LINK_TTL));
        code
    }

    /// Whom a sign-in link's code signs in (and with which token), if it is
    /// live; it is used up.
    pub fn redeem(&self, code: &str) -> Option<(Principal, Credential)> {
        let (principal, credential, expires) =
            self.links.lock().expect("link lock").remove(code)?;
        (expires > Instant::now()).then_some((principal, credential))
    }

    /// Starts a session for `principal`, signed in with the token of
    /// `credential`; returns its id (the cookie's value).
    pub fn start(&self, principal: Principal, credential: Credential) -> String {
        let id = random_token();
        let mut session = Session {
            principal,
            csrf: random_token(),
            credential,
            expires: Instant::now() + SESSION_TTL,
            kept: false,
        };
        session.kept = self.save(&id, &session);
        self.remember(id.clone(), session);
        id
    }

    /// Holds `session` in memory, making room past [`MAX_SESSIONS`] by
    /// dropping the expired ones, then the one that expires soonest (a
    /// kept one is read from the store again when its cookie comes back).
    fn remember(&self, id: String, session: Session) {
        let mut by_id = self.by_id.lock().expect("session lock");
        if by_id.len() >= self.most && !by_id.contains_key(&id) {
            let now = Instant::now();
            by_id.retain(|_, s| s.expires > now);
            if by_id.len() >= self.most
                && let Some(oldest) = by_id
                    .iter()
                    .min_by_key(|(_, s)| s.expires)
                    .map(|(k, _)| k.clone())
            {
                by_id.remove(&oldest);
            }
        }
        by_id.insert(id, session);
    }

    /// The live session the request's cookie names.
    pub fn of(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let mut by_id = self.by_id.lock().expect("session lock");
        match by_id.get(&id) {
            Some(s) if s.expires > Instant::now() && !s.kept => return Some(s.clone()),
            Some(s) if s.expires > Instant::now() => {
                let s = s.clone();
                drop(by_id);
                // Signed out on another replica: gone from the store. (A
                // store that cannot answer now does not sign anyone out.)
                if self.store.as_ref().is_some_and(|store| {
                    store
                        .contains(Collection::ConsoleSessions, &stored_key(&id))
                        .is_ok_and(|kept| !kept)
                }) {
                    self.by_id.lock().expect("session lock").remove(&id);
                    return None;
                }
                return Some(s);
            }
            Some(_) => {
                by_id.remove(&id);
                return None;
            }
            None => {}
        }
        drop(by_id);
        // Started before a restart, or by another replica.
        let session = self.load(&id)?;
        self.remember(id, session.clone());
        Some(session)
    }

    /// Ends the session the request's cookie names.
    pub fn end(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            self.by_id.lock().expect("session lock").remove(&id);
            if let Some(store) = &self.store
                && let Err(e) = store
                    .remove(Collection::ConsoleSessions, &stored_key(&id))
                    .and_then(|_| store.flush_blocking())
            {
                tracing::warn!(error = %e, "removing a console session failed; it ends when it expires");
            }
        }
    }
}

/// 32 random bytes, URL-safe base64.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The value of cookie `name` in the request.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Adds a `Set-Cookie` to `response`: HttpOnly, SameSite=Strict, for the
/// whole site, and `Secure` when `secure`; `max_age` 0 removes the cookie.
pub fn set_cookie(
    response: &mut Response,
    name: &str,
    value: &str,
    max_age: Duration,
    secure: bool,
) {
    let cookie = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    // Names are ours and values random tokens (URL-safe base64): always a
    // valid header value.
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

/// Whether two tokens are equal, in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_session_is_found_by_its_cookie_until_it_ends() {
        let sessions = Sessions::default();
        let id = sessions.start(Principal::Admin, [1; 32]);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {SESSION_COOKIE}={id}")).unwrap(),
        );
        let session = sessions.of(&headers).expect("the session");
        assert_eq!(session.principal, Principal::Admin);
        assert_eq!(session.csrf.len(), 43);
        sessions.end(&headers);
        assert!(sessions.of(&headers).is_none());
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("sb_session=made-up"),
        );
        assert!(sessions.of(&headers).is_none());
    }

    #[test]
    fn a_session_kept_in_the_store_outlives_the_process() {
        let store = Store::temporary().unwrap();
        let id = Sessions::new(store.clone()).start(
            Principal::Account(AccountKey::new("acme").unwrap()),
            [7; 32],
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={id}")).unwrap(),
        );
        // Another process (a restart, a replica) over the same store.
        let later = Sessions::new(store.clone());
        let session = later.of(&headers).expect("the session");
        assert_eq!(
            session.principal,
            Principal::Account(AccountKey::new("acme").unwrap())
        );
        assert_eq!(session.credential, [7; 32]);
        // The id itself is nowhere in the store.
        let kept = store.scan_prefix(Collection::ConsoleSessions, &[]).unwrap();
        assert_eq!(kept.len(), 1);
        assert!(!kept[0].0.windows(id.len()).any(|w| w == id.as_bytes()));
        later.end(&headers);
        assert!(Sessions::new(store).of(&headers).is_none());
    }

    /// A request's headers carrying session `id`'s cookie.
    fn with(id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={id}")).unwrap(),
        );
        headers
    }

    #[test]
    fn sessions_read_from_the_store_are_held_within_the_cap_too() {
        let store = Store::temporary().unwrap();
        let first = Sessions::new(store.clone());
        let ids: Vec<String> = (0..3)
            .map(|_| first.start(Principal::Admin, [3; 32]))
            .collect();
        // After a restart, every cookie comes back: each is read from the
        // store, and memory holds at most the cap.
        let later = Sessions {
            most: 2,
            ..Sessions::new(store)
        };
        for id in ids.iter().chain(&ids) {
            assert!(later.of(&with(id)).is_some());
            assert!(later.by_id.lock().unwrap().len() <= 2);
        }
    }

    /// A principal signing in over and over keeps its latest sessions, up
    /// to the cap: a further sign-in signs its oldest out (its cookie no
    /// longer works, here or on a process that reads the store), and the
    /// store holds no more than the cap of it. Other principals' sessions
    /// are untouched.
    #[test]
    fn a_principal_signing_in_over_and_over_keeps_its_latest_sessions() {
        let store = Store::temporary().unwrap();
        let sessions = Sessions {
            most_each: 2,
            ..Sessions::new(store.clone())
        };
        let acme = || Principal::Account(AccountKey::new("acme").unwrap());
        let admin = sessions.start(Principal::Admin, [1; 32]);
        let ids: Vec<String> = (0..3).map(|_| sessions.start(acme(), [4; 32])).collect();
        assert!(
            sessions.of(&with(&ids[0])).is_none(),
            "the oldest signed out"
        );
        assert!(Sessions::new(store.clone()).of(&with(&ids[0])).is_none());
        for id in [&ids[1], &ids[2], &admin] {
            assert!(sessions.of(&with(id)).is_some());
            assert!(Sessions::new(store.clone()).of(&with(id)).is_some());
        }
        let stored = store.scan_prefix(Collection::ConsoleSessions, &[]).unwrap();
        assert_eq!(stored.len(), 3, "two of acme's, the admin's");
    }

    #[test]
    fn a_sign_in_link_works_once() {
        let sessions = Sessions::default();
        let code = sessions.sign_in_link(Principal::Admin, [2; 32]);
        assert_eq!(sessions.redeem(&code), Some((Principal::Admin, [2; 32])));
        assert_eq!(sessions.redeem(&code), None);
        assert_eq!(sessions.redeem("made-up"), None);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
    }
}
