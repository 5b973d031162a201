//! Signed links: HS256 JWTs that say who may connect to whom.
//!
//! When `SWITCHBOARD_AUTH_SECRET` is set, `/ws` needs `token=<JWT>`, signed
//! with that secret, whose claims are `sub` (the userID), `peer` (the peerID)
//! and `exp` (expiry, Unix seconds). Identity comes from the token: `userID`
//! and `peerID` may be left out of the query, and if they are given they must
//! equal the claims. Anything else is refused with 401 before the upgrade.
//!
//! The token is checked once, at the upgrade: a session that is open when its
//! token expires stays open, but a reconnect after that is refused.
//!
//! Tokens are credentials: nothing here logs them or echoes them back, and
//! [`Secret`] and [`LinkSigner`] never print their key.
//!
//! A token is a compact JWS (RFC 7515) signed with HS256 (RFC 7518): header
//! `{"typ":"JWT","alg":"HS256"}`, the claims, and an HMAC-SHA256 of both,
//! each base64url without padding. It is made and checked here with
//! RustCrypto's `hmac` and `sha2`; `hmac` compares the MAC in constant time.
//! No JWT crate is used: jsonwebtoken's pure-Rust backend builds RSA, P-256,
//! P-384 and Ed25519 into the server for HS256 alone (`rsa` among them, which
//! has an advisory without a fixed release, RUSTSEC-2023-0071), and no
//! well-kept JWT crate offers HMAC alone. The checks are those jsonwebtoken
//! made before (`Validation::new(HS256)` with `exp` and `sub` required, `nbf`
//! checked, no leeway), in its order, with the same answers; the unit tests
//! pin them with tokens it signed and refused. Two checks go further (issue
//! 16): an `exp` beyond [`MAX_LINK_TTL`] from now is refused, and an `aud`
//! gets its own reason instead of "malformed". Header fields other than `alg`
//! are not read.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use crate::pair::{Identity, PairId, UserId};

/// Shortest accepted `SWITCHBOARD_AUTH_SECRET`, in bytes (RFC 7518 asks HS256
/// keys to be at least as long as the hash: 256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// Longest lifetime of a signed link: about ten years.
pub const MAX_LINK_TTL: Duration = Duration::from_secs(10 * 366 * 86400);

/// A secret from the settings. Its `Debug` output never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: &str) -> Self {
        Self(Arc::from(value))
    }

    /// The secret's bytes, for keying a MAC.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The claims of a call token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user this token lets connect.
    pub sub: String,
    /// The only peer this user may be paired with.
    pub peer: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a token was refused. Each message is fixed text: it never contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Auth is on and the query has no `token`.
    #[error("a signed token is required (query parameter token)")]
    Missing,
    /// Not a JWT, or its header or claims can't be read.
    #[error("the token is malformed")]
    Malformed,
    /// Signed with another key or another algorithm than HS256.
    #[error("the token's signature is not valid")]
    BadSignature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` lies in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `exp` lies further ahead than the longest link lifetime, [`MAX_LINK_TTL`].
    #[error("the token's expiry is further away than the longest link lifetime (10 years)")]
    TooLong,
    /// The claims name an audience (`aud`): call links are issued for none,
    /// and RFC 7519 (4.1.3) has a token refused by a party not in its audience.
    #[error("the token names an audience (aud), which call links never do")]
    Audience,
    /// The claims hold IDs that are invalid, or the same user twice.
    #[error("the token's claims are not a valid pair of IDs")]
    BadClaims,
    /// `userID` in the query differs from the token's `sub`.
    #[error("the token was issued for another userID")]
    UserMismatch,
    /// `peerID` in the query differs from the token's `peer`.
    #[error("the token was issued for another peerID")]
    PeerMismatch,
}

/// The header of every token signed here.
const HEADER: &str = r#"{"typ":"JWT","alg":"HS256"}"#;

/// JWS algorithms other than HS256: a token that names one is refused as
/// [`TokenError::BadSignature`]; any other name as [`TokenError::Malformed`].
const OTHER_ALGORITHMS: [&str; 11] =
    ["HS384", "HS512", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"];

/// Signs and verifies call tokens with one HS256 key.
#[derive(Clone)]
pub struct LinkSigner {
    /// HMAC-SHA256, keyed once; cloned for each token.
    key: Hmac<Sha256>,
}

impl fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkSigner(HS256, <redacted>)")
    }
}

/// Seconds since the Unix epoch of `t` (0 before the epoch).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl LinkSigner {
    /// A signer keyed with `secret`.
    pub fn new(secret: &Secret) -> Self {
        Self { key: Hmac::new_from_slice(secret.expose()).expect("HMAC takes keys of any length") }
    }

    /// The MAC of `message` under this key.
    fn mac(&self, message: &str) -> Hmac<Sha256> {
        let mut mac = self.key.clone();
        mac.update(message.as_bytes());
        mac
    }

    /// A token for `user` to call `peer`, valid until `expires`.
    pub fn sign(&self, user: &UserId, peer: &UserId, expires: SystemTime) -> String {
        let claims = Claims { sub: user.to_string(), peer: peer.to_string(), exp: unix_secs(expires) };
        let claims = serde_json::to_vec(&claims).expect("claims of strings and a number serialize");
        let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(HEADER), URL_SAFE_NO_PAD.encode(claims));
        let signature = self.mac(&message).finalize().into_bytes();
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Verifies the signature, algorithm and time claims of `token`.
    ///
    /// In this order: the header must name HS256; the signature must match;
    /// the claims must hold `sub`, `peer` and `exp` (and `nbf`, if present,
    /// must be a date); `exp` must not have passed and `nbf` must have come,
    /// with no grace period, since a token is checked once, when the socket
    /// opens; `exp` must lie within [`MAX_LINK_TTL`] from now (no link is made
    /// for longer, so a later one is a mistake or a forgery meant to last);
    /// and an audience (`aud`) is refused, since links name none (RFC 7519
    /// 4.1.3). Other claims (`iat`, `iss`, `jti`, ...) are ignored.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        use TokenError::{BadSignature, Malformed};
        let (message, signature) = token.rsplit_once('.').ok_or(Malformed)?;
        let (header, claims) = message.rsplit_once('.').ok_or(Malformed)?;
        let header: serde_json::Map<String, Value> = decode_json(header)?;
        match header.get("alg").and_then(Value::as_str) {
            Some("HS256") => {}
            Some(other) if OTHER_ALGORITHMS.contains(&other) => return Err(BadSignature),
            _ => return Err(Malformed),
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| Malformed)?;
        self.mac(message).verify_slice(&signature).map_err(|_| BadSignature)?;

        let claims: serde_json::Map<String, Value> = decode_json(claims)?;
        let nbf = claims.get("nbf").map(|nbf| numeric_date(nbf).ok_or(Malformed)).transpose()?;
        let audience = claims.get("aud").is_some_and(|aud| match aud {
            Value::String(_) => true,
            Value::Array(items) => items.iter().all(Value::is_string),
            _ => false,
        });
        let claims: Claims = serde_json::from_value(Value::Object(claims)).map_err(|_| Malformed)?;
        let now = unix_secs(SystemTime::now());
        if claims.exp < now {
            return Err(TokenError::Expired);
        }
        if nbf.is_some_and(|nbf| nbf > now) {
            return Err(TokenError::NotYetValid);
        }
        if claims.exp > now.saturating_add(MAX_LINK_TTL.as_secs()) {
            return Err(TokenError::TooLong);
        }
        if audience {
            return Err(TokenError::Audience);
        }
        Ok(claims)
    }

    /// The identity of a `/ws` request: from the token, checked against the
    /// query's `userID` and `peerID` when those are given.
    pub fn identify(
        &self,
        token: Option<&str>,
        user_id: Option<&str>,
        peer_id: Option<&str>,
    ) -> Result<Identity, TokenError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        let claims = self.verify(token)?;
        if user_id.is_some_and(|u| u != claims.sub) {
            return Err(TokenError::UserMismatch);
        }
        if peer_id.is_some_and(|p| p != claims.peer) {
            return Err(TokenError::PeerMismatch);
        }
        let user = UserId::parse(&claims.sub).map_err(|_| TokenError::BadClaims)?;
        let peer = UserId::parse(&claims.peer).map_err(|_| TokenError::BadClaims)?;
        let pair = PairId::new(&user, &peer).map_err(|_| TokenError::BadClaims)?;
        Ok(Identity { user, pair })
    }
}

/// The JSON object in a base64url part of a token.
fn decode_json(part: &str) -> Result<serde_json::Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// A JWT NumericDate as whole seconds: a non-negative integer, or a finite
/// non-negative number rounded (as jsonwebtoken read `nbf`).
fn numeric_date(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value.as_f64().filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64).map(|f| f.round() as u64)
    })
}

/// Why `switchboard link` can't make links.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// `--user` or `--peer` is not a valid ID, or they are equal.
    #[error("{0}")]
    BadId(String),
    /// `--base-url` is not an `http(s)://` URL without query or fragment.
    #[error("--base-url must be an http:// or https:// URL without ? or #, e.g. https://call.example.com")]
    BadBaseUrl,
    /// `--ttl` is zero or too large.
    #[error("--ttl must be more than zero and at most 10 years")]
    BadTtl,
}

/// One user's signed call link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallLink {
    /// Whose link it is.
    pub user: UserId,
    /// `{base}/call?userID=..&peerID=..&token=..`.
    pub url: String,
}

/// The two signed links of a call between `user` and `peer`, each valid for `ttl` from `now`.
pub fn call_links(
    signer: &LinkSigner,
    base_url: &str,
    user: &str,
    peer: &str,
    ttl: Duration,
    now: SystemTime,
) -> Result<[CallLink; 2], LinkError> {
    let user = UserId::parse(user).map_err(|e| LinkError::BadId(format!("--user: {e}")))?;
    let peer = UserId::parse(peer).map_err(|e| LinkError::BadId(format!("--peer: {e}")))?;
    PairId::new(&user, &peer).map_err(|_| LinkError::BadId("--user and --peer must differ".into()))?;
    let base = base_url.trim_end_matches('/');
    let scheme_ok = base.starts_with("http://") || base.starts_with("https://");
    let host_ok = base.split_once("://").is_some_and(|(_, rest)| !rest.is_empty());
    if !scheme_ok || !host_ok || base.contains(['?', '#']) || base.chars().any(|c| c.is_whitespace()) {
        return Err(LinkError::BadBaseUrl);
    }
    if ttl.is_zero() || ttl > MAX_LINK_TTL {
        return Err(LinkError::BadTtl);
    }
    let expires = now + ttl;
    // IDs are URL-safe by construction, and a JWT is base64url text and dots.
    let link = |me: &UserId, other: &UserId| CallLink {
        user: me.clone(),
        url: format!("{base}/call?userID={me}&peerID={other}&token={}", signer.sign(me, other, expires)),
    };
    Ok([link(&user, &peer), link(&peer, &user)])
}

/// Signs and checks resume tokens (`SWITCHBOARD_RESUME_SECS`): a welcome
/// gives one to a client that asked to resume later, and a later session
/// may resume the pair's history only with a token made for the same user
/// and pair. Token: `{session:x}.{MAC}`, the MAC (HMAC-SHA256, base64url) over
/// the user, the pair and the session that was first given it: the one that
/// began the client's numbering of its messages (confirmed sends), which
/// every session resuming it carries on.
///
/// The key comes from a configured secret, is random (one process), or is
/// [`ResumeKey::shared`]: learned from the broker, where the first replica
/// to start put a random secret, so that replicas without a configured
/// secret still take each other's tokens. Clones share the key: a shared key
/// learned later (or changed, after Redis lost it) holds for every clone.
#[derive(Clone)]
pub struct ResumeKey {
    keys: Arc<std::sync::RwLock<Keys>>,
    shared: bool,
}

/// The key that signs, and the one before it, which still verifies tokens
/// given out before a change.
#[derive(Default)]
struct Keys {
    current: Option<(Hmac<Sha256>, String)>,
    previous: Option<Hmac<Sha256>>,
}

impl fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeKey(<redacted>)")
    }
}

impl ResumeKey {
    /// A key from `secret` (`SWITCHBOARD_RESUME_SECRET`, or the link secret).
    pub fn new(secret: &Secret) -> Self {
        let key = Self::shared();
        key.adopt(&String::from_utf8_lossy(secret.expose()));
        Self { shared: false, ..key }
    }

    /// A key of random bytes, for one process (the in-memory broker).
    pub fn random() -> Self {
        Self::new(&Secret::new(&Self::random_secret()))
    }

    /// No key yet: it is learned from the broker ([`ResumeKey::adopt`]).
    pub fn shared() -> Self {
        Self { keys: Arc::default(), shared: true }
    }

    /// 32 random bytes in hex: a secret for the broker to share.
    pub fn random_secret() -> String {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether the key is learned from the broker.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Whether tokens can be made and checked (a shared key is learned).
    pub fn is_known(&self) -> bool {
        self.read().current.is_some()
    }

    /// The secret of the current key, if it came from [`ResumeKey::adopt`]
    /// (a shared key: to be put back should the broker lose it).
    pub fn secret(&self) -> Option<String> {
        self.read().current.as_ref().map(|(_, secret)| secret.clone())
    }

    /// Makes the key derived from `secret` the current one, the old one
    /// verifying still. Whether it changed.
    pub fn adopt(&self, secret: &str) -> bool {
        let mut keys = self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if keys.current.as_ref().is_some_and(|(_, known)| known == secret) {
            return false;
        }
        // A key of its own: a resume token can never pass as a link's signature.
        let mut derive = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
        derive.update(b"switchboard resume key v1");
        let key = Hmac::new_from_slice(&derive.finalize().into_bytes()).expect("HMAC takes keys of any length");
        keys.previous = keys.current.take().map(|(key, _)| key);
        keys.current = Some((key, secret.to_owned()));
        true
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn mac(key: &Hmac<Sha256>, identity: &Identity, session: &str) -> Hmac<Sha256> {
        let mut mac = key.clone();
        let (user, pair) = (&identity.user, &identity.pair);
        // IDs hold no spaces: the fields can't run into one another.
        let peer = pair.other(user);
        mac.update(format!("{user} {peer} {session}").as_bytes());
        mac
    }

    /// The token of `session` for `identity`; `None` while a shared key is
    /// not learned yet.
    pub fn token(&self, identity: &Identity, session: u64) -> Option<String> {
        let keys = self.read();
        let (key, _) = keys.current.as_ref()?;
        let session = format!("{session:x}");
        let mac = Self::mac(key, identity, &session).finalize().into_bytes();
        Some(format!("{session}.{}", URL_SAFE_NO_PAD.encode(mac)))
    }

    /// The session `token` was made for by [`ResumeKey::token`], if it was
    /// made for `identity` with the current key or the one before.
    pub fn verify(&self, identity: &Identity, token: &str) -> Option<u64> {
        let (session, mac) = token.split_once('.')?;
        if session.is_empty() || session.len() > 16 || !session.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let keys = self.read();
        let current = keys.current.as_ref().map(|(key, _)| key);
        let valid = [current, keys.previous.as_ref()]
            .into_iter()
            .flatten()
            .any(|key| Self::mac(key, identity, session).verify_slice(&mac).is_ok());
        drop(keys);
        valid.then(|| u64::from_str_radix(session, 16).ok()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secret: &str) -> LinkSigner {
        LinkSigner::new(&Secret::new(secret))
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn id(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn round_trip_and_identity_from_the_token() {
        let s = signer(KEY);
        let token = s.sign(&id("alice"), &id("bob"), SystemTime::now() + Duration::from_secs(60));
        let who = s.identify(Some(&token), None, None).unwrap();
        assert_eq!(who.user.as_str(), "alice");
        assert_eq!(who.pair.other(&who.user).as_str(), "bob");
        assert!(s.identify(Some(&token), Some("alice"), Some("bob")).is_ok());
        assert_eq!(s.identify(Some(&token), Some("bob"), None).unwrap_err(), TokenError::UserMismatch);
        assert_eq!(s.identify(Some(&token), None, Some("carol")).unwrap_err(), TokenError::PeerMismatch);
        assert_eq!(s.identify(None, Some("alice"), Some("bob")).unwrap_err(), TokenError::Missing);
        assert_eq!(s.identify(Some(""), None, None).unwrap_err(), TokenError::Missing);
    }

    #[test]
    fn refuses_bad_tokens_with_the_right_reason() {
        let s = signer(KEY);
        let later = SystemTime::now() + Duration::from_secs(60);
        let token = s.sign(&id("alice"), &id("bob"), later);
        let other = signer("another secret, also 32 bytes long").sign(&id("alice"), &id("bob"), later);
        assert_eq!(s.verify(&other).unwrap_err(), TokenError::BadSignature);
        let expired = s.sign(&id("alice"), &id("bob"), SystemTime::now() - Duration::from_secs(5));
        assert_eq!(s.verify(&expired).unwrap_err(), TokenError::Expired);
        for junk in ["", "x", "a.b.c", "a.b", &token[..token.len() / 2]] {
            assert!(matches!(s.verify(junk), Err(TokenError::Malformed | TokenError::BadSignature)), "{junk}");
        }
        // Same claims signed with HS512 under the same key: refused, only HS256 counts.
        let claims = serde_json::to_string(&Claims { sub: "alice".into(), peer: "bob".into(), exp: unix_secs(later) });
        let hs512 = jws(r#"{"typ":"JWT","alg":"HS512"}"#, &claims.unwrap(), |message| {
            let mut mac = Hmac::<sha2::Sha512>::new_from_slice(KEY.as_bytes()).unwrap();
            mac.update(message);
            mac.finalize().into_bytes().to_vec()
        });
        assert_eq!(s.verify(&hs512).unwrap_err(), TokenError::BadSignature);
        // A signed token whose claims are not a valid pair.
        let same = serde_json::to_string(&Claims { sub: "alice".into(), peer: "alice".into(), exp: unix_secs(later) });
        let same = raw(r#"{"typ":"JWT","alg":"HS256"}"#, &same.unwrap(), KEY);
        assert_eq!(s.identify(Some(&same), None, None).unwrap_err(), TokenError::BadClaims);
    }

    /// A token with exactly this header and claims JSON, signed with
    /// HMAC-SHA256 under `key`: whatever the header claims its algorithm is.
    fn raw(header: &str, claims: &str, key: &str) -> String {
        jws(header, claims, |message| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(message);
            mac.finalize().into_bytes().to_vec()
        })
    }

    /// `header.claims.signature`, each base64url, signed by `sign`.
    fn jws(header: &str, claims: &str, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
        let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let signature = sign(message.as_bytes());
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// 2100-01-01 and 2001-09-09, in Unix seconds.
    const FUTURE: u64 = 4_102_444_800;
    const PAST: u64 = 1_000_000_000;

    #[test]
    fn a_token_is_byte_for_byte_what_jsonwebtoken_signed() {
        // Made by jsonwebtoken 10 (HS256, header {"typ":"JWT","alg":"HS256"}),
        // which signed links before: links already handed out stay valid and
        // new ones look the same.
        let token = signer(KEY).sign(&id("alice"), &id("bob"), UNIX_EPOCH + Duration::from_secs(FUTURE));
        assert_eq!(token, VECTOR);
        assert_eq!(
            token,
            raw(r#"{"typ":"JWT","alg":"HS256"}"#, r#"{"sub":"alice","peer":"bob","exp":4102444800}"#, KEY)
        );
    }

    const VECTOR: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsInBlZXIiOiJib2IiLCJleHAiOjQxMDI0NDQ4MDB9.33GH3tZ1v5tcjLppG1xjzRvuiTbGkVNrkazmVGLrmHY";

    #[test]
    fn verify_answers_as_jsonwebtoken_did() {
        use TokenError::{Audience, BadSignature, Expired, Malformed, NotYetValid};
        let s = signer(KEY);
        // Within the longest link lifetime from now (a later expiry is refused, see below).
        let soon = unix_secs(SystemTime::now()) + 86400;
        const H: &str = r#"{"typ":"JWT","alg":"HS256"}"#;
        let claims = |extra: &str| format!(r#"{{"sub":"alice","peer":"bob","exp":{soon}{extra}}}"#);
        let ok = claims("");
        let header = |alg: &str| format!(r#"{{"typ":"JWT","alg":"{alg}"}}"#);
        let cases: Vec<(String, Result<(), TokenError>)> = vec![
            (raw(H, &ok, KEY), Ok(())),
            (raw(r#"{"alg":"HS256"}"#, &ok, KEY), Ok(())),
            (raw(r#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#, &ok, KEY), Ok(())),
            (raw(&header("none"), &ok, KEY), Err(Malformed)),
            (raw(&header("hs256"), &ok, KEY), Err(Malformed)),
            (raw(r#"{"typ":"JWT"}"#, &ok, KEY), Err(Malformed)),
            (raw("[]", &ok, KEY), Err(Malformed)),
            (raw("not json", &ok, KEY), Err(Malformed)),
            (raw(&header("HS384"), &ok, KEY), Err(BadSignature)),
            (raw(&header("HS512"), &ok, KEY), Err(BadSignature)),
            (raw(&header("RS256"), &ok, KEY), Err(BadSignature)),
            (raw(&header("PS512"), &ok, KEY), Err(BadSignature)),
            (raw(&header("ES256"), &ok, KEY), Err(BadSignature)),
            (raw(&header("EdDSA"), &ok, KEY), Err(BadSignature)),
            (raw(H, &ok, "another secret, also 32 bytes long"), Err(BadSignature)),
            // The signature is checked before the claims are read.
            (
                raw(H, r#"{"sub":"alice","peer":"bob","exp":1}"#, "another secret, also 32 bytes long"),
                Err(BadSignature),
            ),
            (raw(H, "[]", "another secret, also 32 bytes long"), Err(BadSignature)),
            (raw(H, "[]", KEY), Err(Malformed)),
            (raw(H, r#"{"sub":"alice","peer":"bob"}"#, KEY), Err(Malformed)),
            (raw(H, &format!(r#"{{"peer":"bob","exp":{soon}}}"#), KEY), Err(Malformed)),
            (raw(H, &format!(r#"{{"sub":"alice","exp":{soon}}}"#), KEY), Err(Malformed)),
            (raw(H, &format!(r#"{{"sub":5,"peer":"bob","exp":{soon}}}"#), KEY), Err(Malformed)),
            (raw(H, &format!(r#"{{"sub":"alice","peer":"bob","exp":"{soon}"}}"#), KEY), Err(Malformed)),
            (raw(H, &format!(r#"{{"sub":"alice","peer":"bob","exp":{soon}.0}}"#), KEY), Err(Malformed)),
            (raw(H, r#"{"sub":"alice","peer":"bob","exp":-1}"#, KEY), Err(Malformed)),
            (raw(H, r#"{"sub":"alice","peer":"bob","exp":null}"#, KEY), Err(Malformed)),
            (raw(H, &format!(r#"{{"sub":"alice","peer":"bob","exp":{PAST}}}"#), KEY), Err(Expired)),
            (raw(H, &claims(&format!(r#","nbf":{FUTURE}"#)), KEY), Err(NotYetValid)),
            (raw(H, &claims(&format!(r#","nbf":{FUTURE}.0"#)), KEY), Err(NotYetValid)),
            (raw(H, &claims(&format!(r#","nbf":{PAST}"#)), KEY), Ok(())),
            (raw(H, &claims(r#","nbf":1.5"#), KEY), Ok(())),
            (raw(H, &claims(r#","nbf":null"#), KEY), Err(Malformed)),
            (raw(H, &claims(r#","nbf":"1""#), KEY), Err(Malformed)),
            (raw(H, &claims(r#","nbf":-1"#), KEY), Err(Malformed)),
            // An audience is refused, with its own reason: links name none. (A non-string one was ignored.)
            (raw(H, &claims(r#","aud":"x""#), KEY), Err(Audience)),
            (raw(H, &claims(r#","aud":["x"]"#), KEY), Err(Audience)),
            (raw(H, &claims(r#","aud":[]"#), KEY), Err(Audience)),
            (raw(H, &claims(r#","aud":5"#), KEY), Ok(())),
            (raw(H, &claims(r#","aud":null"#), KEY), Ok(())),
            (raw(H, &claims(r#","iss":"x","jti":"y","extra":[1]"#), KEY), Ok(())),
        ];
        let wrong: Vec<_> = cases
            .iter()
            .enumerate()
            .filter_map(|(i, (token, expected))| {
                let got = s.verify(token).map(drop);
                (got != *expected).then(|| format!("case {i}: {got:?}, not {expected:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        // The framing: three base64url parts without padding.
        let good = raw(H, &ok, KEY);
        let (message, signature) = good.rsplit_once('.').unwrap();
        let (head, body) = message.split_once('.').unwrap();
        for (token, expected) in [
            (format!("{message}."), BadSignature),
            (format!("{message}.!!"), Malformed),
            (format!("{message}.{signature}="), Malformed),
            (format!("{head}.{body}"), Malformed),
            (format!("{good}.{signature}"), Malformed),
            (format!("{head}=.{body}.{signature}"), Malformed),
            (String::new(), Malformed),
            ("..".to_owned(), Malformed),
        ] {
            assert_eq!(s.verify(&token).map(drop), Err(expected), "{token}");
        }
    }

    #[test]
    fn expiry_beyond_the_longest_link_lifetime_is_refused() {
        use TokenError::{Audience, NotYetValid, TooLong};
        let s = signer(KEY);
        const H: &str = r#"{"typ":"JWT","alg":"HS256"}"#;
        let now = unix_secs(SystemTime::now());
        let max = MAX_LINK_TTL.as_secs();
        let with_exp =
            |exp: u64, extra: &str| raw(H, &format!(r#"{{"sub":"alice","peer":"bob","exp":{exp}{extra}}}"#), KEY);
        // The longest link `switchboard link` makes is accepted; a minute more, or forever, is not.
        assert_eq!(s.verify(&with_exp(now + max - 60, "")).map(drop), Ok(()));
        assert_eq!(s.verify(&with_exp(now + max + 60, "")).map(drop), Err(TooLong));
        assert_eq!(s.verify(&with_exp(u64::MAX, "")).map(drop), Err(TooLong));
        assert_eq!(s.verify(&with_exp(FUTURE * 10, "")).map(drop), Err(TooLong));
        let [link, _] = call_links(&s, "http://x", "alice", "bob", MAX_LINK_TTL, SystemTime::now()).unwrap();
        assert!(s.verify(link.url.rsplit_once("token=").unwrap().1).is_ok());
        // Registered claims that links don't use are ignored; nbf is honoured.
        let hour = now + 3600;
        assert_eq!(s.verify(&with_exp(hour, &format!(r#","iat":{now},"iss":"app","jti":"1""#))).map(drop), Ok(()));
        assert_eq!(s.verify(&with_exp(hour, &format!(r#","nbf":{}"#, now + 600))).map(drop), Err(NotYetValid));
        assert_eq!(s.verify(&with_exp(hour, r#","aud":"app""#)).map(drop), Err(Audience));
        // Each refusal says why, in words of its own.
        for (error, words) in [(TooLong, "longest link lifetime"), (Audience, "audience (aud)")] {
            assert!(error.to_string().contains(words), "{error}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let secret = Secret::new(KEY);
        assert!(!format!("{secret:?}").contains(KEY));
        assert!(!format!("{:?}", signer(KEY)).contains(KEY));
    }

    #[test]
    fn links_for_both_sides() {
        let s = signer(KEY);
        let now = SystemTime::now();
        let [a, b] =
            call_links(&s, "https://call.example.com/", "alice", "bob", Duration::from_secs(3600), now).unwrap();
        assert_eq!(a.user.as_str(), "alice");
        assert!(a.url.starts_with("https://call.example.com/call?userID=alice&peerID=bob&token="), "{}", a.url);
        assert!(b.url.starts_with("https://call.example.com/call?userID=bob&peerID=alice&token="), "{}", b.url);
        let token = b.url.rsplit_once("token=").unwrap().1;
        let claims = s.verify(token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.peer.as_str()), ("bob", "alice"));
        assert_eq!(claims.exp, unix_secs(now) + 3600);
        let hour = Duration::from_secs(3600);
        for base in ["ftp://x", "call.example.com", "https://", "https://x/?a=1", "https://x/#f", "https://a b"] {
            assert!(matches!(call_links(&s, base, "alice", "bob", hour, now), Err(LinkError::BadBaseUrl)), "{base}");
        }
        assert!(matches!(call_links(&s, "http://x", "alice", "alice", hour, now), Err(LinkError::BadId(_))));
        assert!(matches!(call_links(&s, "http://x", "a:b", "bob", hour, now), Err(LinkError::BadId(_))));
        assert!(matches!(call_links(&s, "http://x", "alice", "bob", Duration::ZERO, now), Err(LinkError::BadTtl)));
    }

    #[test]
    fn a_resume_token_fits_its_own_user_and_pair_only() {
        let key = ResumeKey::new(&Secret::new("a resume secret of 32 bytes, or more"));
        let who =
            |user: &str, peer: &str| Identity { user: id(user), pair: PairId::new(&id(user), &id(peer)).unwrap() };
        let token = key.token(&who("alice", "bob"), 0xabc).unwrap();
        assert!(token.starts_with("abc."));
        assert_eq!(key.verify(&who("alice", "bob"), &token), Some(0xabc), "its session");
        assert!(key.verify(&who("bob", "alice"), &token).is_none(), "the peer can't use it");
        assert!(key.verify(&who("alice", "carol"), &token).is_none(), "nor can another pair");
        let other = ResumeKey::new(&Secret::new("another secret, also 32 bytes long"));
        assert!(other.verify(&who("alice", "bob"), &token).is_none(), "another key");
        assert!(ResumeKey::random().verify(&who("alice", "bob"), &token).is_none());
        let (_, mac) = token.split_once('.').unwrap();
        for forged in [
            format!("abd.{mac}"),
            "abc.".into(),
            "abc".into(),
            String::new(),
            format!("xyz.{mac}"),
            format!("{token}A"),
        ] {
            assert!(key.verify(&who("alice", "bob"), &forged).is_none(), "{forged:?}");
        }
        // A link signed with the same secret is no resume token, nor the reverse.
        let link = LinkSigner::new(&Secret::new("a resume secret of 32 bytes, or more"));
        assert!(key.verify(&who("alice", "bob"), &link.sign(&id("alice"), &id("bob"), SystemTime::now())).is_none());
    }

    #[test]
    fn a_shared_resume_key_is_learned_and_the_one_before_still_verifies() {
        let who = Identity { user: id("alice"), pair: PairId::new(&id("alice"), &id("bob")).unwrap() };
        let key = ResumeKey::shared();
        let clone = key.clone();
        assert!(key.is_shared() && !key.is_known());
        assert_eq!(key.token(&who, 1), None, "no token before the key is learned");
        let (first, second, third) =
            (ResumeKey::random_secret(), ResumeKey::random_secret(), ResumeKey::random_secret());
        assert_eq!(first.len(), 64);
        assert_ne!(first, second);
        assert!(clone.adopt(&first), "a clone learns it for all");
        assert!(!key.adopt(&first), "the same secret changes nothing");
        assert_eq!(key.secret().as_deref(), Some(first.as_str()));
        let old = key.token(&who, 1).unwrap();
        assert_eq!(
            ResumeKey::new(&Secret::new(&first)).token(&who, 1).as_ref(),
            Some(&old),
            "as from a configured secret"
        );
        assert!(key.adopt(&second));
        let new = key.token(&who, 2).unwrap();
        assert_eq!((key.verify(&who, &old), key.verify(&who, &new)), (Some(1), Some(2)), "the key before verifies");
        assert!(key.adopt(&third));
        assert_eq!((key.verify(&who, &old), key.verify(&who, &new)), (None, Some(2)), "two keys back does not");
        assert!(!ResumeKey::new(&Secret::new(&first)).is_shared());
    }
}
