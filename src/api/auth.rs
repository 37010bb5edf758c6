//! Who may call what.
//!
//! A caller sends `authorization: Bearer <token>`. A token is either a signed
//! JWT (HS256 with a shared secret, RS256/ES256 checked with a public key, or
//! checked with the key its `kid` names in a JWK set file, re-read when it
//! changes) or one of the static tokens of `AUTH_TOKENS_FILE`, which holds only their
//! SHA-256 hashes, compared in constant time. A token grants roles: `read`
//! (Get, BatchGet, List), `write` (Create, Update, Delete) and `admin`
//! (CacheAdminService); what each method needs is its row in `methods`.
//!
//! The check is a tower layer in front of admission and every handler: a
//! missing or bad token is UNAUTHENTICATED, a good one without the role
//! PERMISSION_DENIED, and neither costs more than a hash or a signature check.
//! Health and reflection are open. With no authentication configured every
//! call passes; the service then listens on loopback only (see `app`).

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures_util::future::{Either, Ready, ready};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet},
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use super::methods::{self, Access, Role};
use crate::config::{AuthConfig, same_digest};

/// The roles one token grants. Roles do not imply each other: a token for a
/// service that only reads should not be able to write, and an operator's
/// admin token need not read user data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        names.into_iter().try_fold(Self::default(), |roles, name| {
            Role::parse(name)
                .map(|role| Self(roles.0 | role.bit()))
                .ok_or_else(|| format!("unknown role `{name}` (known: read, write, admin)"))
        })
    }
}

/// Checks bearer tokens against the configured static tokens and JWT key.
pub struct Authenticator {
    static_tokens: Vec<StaticToken>,
    jwt: Option<JwtVerifier>,
}

#[derive(Debug)]
struct StaticToken {
    sha256: [u8; 32],
    roles: Roles,
}

struct JwtVerifier {
    keys: JwtKeys,
    /// Longest `exp - iat`, in seconds.
    max_lifetime: u64,
}

/// The keys JWTs are checked with.
enum JwtKeys {
    /// `AUTH_JWT_SECRET` or `AUTH_JWT_PUBLIC_KEY_FILE`: tokens name no key.
    One(VerifyingKey),
    /// `AUTH_JWKS_FILE`: the key a token's `kid` header names. Replaced
    /// whole when the file changes, so a key can be added before tokens
    /// signed with it appear and removed after the last one expired.
    Set {
        path: PathBuf,
        /// How every key's tokens are validated, but for the algorithm.
        template: Validation,
        keys: RwLock<Arc<KeySet>>,
    },
}

/// A key set by `kid`.
type KeySet = HashMap<String, VerifyingKey>;

struct VerifyingKey {
    key: DecodingKey,
    /// The claims checked, and the one algorithm accepted with this key.
    validation: Validation,
}

/// How often `AUTH_JWKS_FILE` is read for changes (SIGHUP reads it at once).
const JWKS_POLL: Duration = Duration::from_secs(1);

/// The claims read from a JWT besides those `validation` checks (`exp`,
/// `nbf`, and `iss`/`aud`, required when configured).
#[derive(Deserialize)]
struct Claims {
    exp: u64,
    iat: u64,
    #[serde(default)]
    roles: Vec<String>,
}

/// Why a call was refused; the message a caller sees says no more than this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MissingToken,
    InvalidToken,
    MissingRole(Role),
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::MissingRole(_) => "missing_role",
        }
    }

    fn status(self) -> Status {
        match self {
            Self::MissingToken => Status::unauthenticated("missing `authorization: Bearer <token>` metadata"),
            Self::InvalidToken => Status::unauthenticated("invalid or expired token"),
            Self::MissingRole(role) => Status::permission_denied(format!("the token lacks the `{role}` role")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        })
    }
}

impl Authenticator {
    /// `None` when no authentication is configured.
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Option<Self>> {
        let static_tokens = match &config.auth_tokens_file {
            Some(path) => read_tokens_file(path)?,
            None => Vec::new(),
        };
        let sources = [
            config.auth_jwt_secret.is_some(),
            config.auth_jwt_public_key_file.is_some(),
            config.auth_jwks_file.is_some(),
        ];
        if sources.into_iter().filter(|set| *set).count() > 1 {
            bail!("set one of AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY_FILE and AUTH_JWKS_FILE");
        }
        let uses_jwts = sources.contains(&true);
        if uses_jwts && config.auth_jwt_audience.is_none() && !config.auth_jwt_any_audience {
            bail!(
                "a JWT key needs AUTH_JWT_AUDIENCE (the audience tokens for this service name), \
                 or AUTH_JWT_ANY_AUDIENCE=true to accept tokens minted for any audience"
            );
        }
        let template = validation(config);
        let one = |key: DecodingKey, algorithm: Algorithm| {
            JwtKeys::One(VerifyingKey {
                key,
                validation: for_algorithm(&template, algorithm),
            })
        };
        let keys = match (
            &config.auth_jwt_secret,
            &config.auth_jwt_public_key_file,
            &config.auth_jwks_file,
        ) {
            (Some(secret), _, _) => {
                if secret.expose().len() < 32 {
                    bail!("AUTH_JWT_SECRET must be at least 32 bytes");
                }
                Some(one(
                    DecodingKey::from_secret(secret.expose().as_bytes()),
                    Algorithm::HS256,
                ))
            }
            (_, Some(path), _) => {
                let (key, algorithm) = read_public_key(path)?;
                Some(one(key, algorithm))
            }
            (_, _, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading AUTH_JWKS_FILE {}", path.display()))?;
                let set =
                    parse_key_set(&text, &template).with_context(|| format!("AUTH_JWKS_FILE {}", path.display()))?;
                Some(JwtKeys::Set {
                    path: path.clone(),
                    template,
                    keys: RwLock::new(Arc::new(set)),
                })
            }
            _ => None,
        };
        let jwt = keys.map(|keys| JwtVerifier {
            keys,
            max_lifetime: config.auth_jwt_max_lifetime.as_secs(),
        });
        if static_tokens.is_empty() && jwt.is_none() {
            if config.auth_tokens_file.is_some() {
                bail!("AUTH_TOKENS_FILE lists no tokens");
            }
            return Ok(None);
        }
        Ok(Some(Self { static_tokens, jwt }))
    }

    /// The roles of the token in an `authorization` header value.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Roles, Refusal> {
        let token = authorization
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or(Refusal::MissingToken)?;
        if let Some(roles) = self.static_roles(token) {
            return Ok(roles);
        }
        let jwt = self.jwt.as_ref().ok_or(Refusal::InvalidToken)?;
        let claims = match &jwt.keys {
            JwtKeys::One(key) => key.decode(token),
            JwtKeys::Set { keys, .. } => {
                let kid = jsonwebtoken::decode_header(token)
                    .map_err(|_| Refusal::InvalidToken)?
                    .kid
                    .ok_or(Refusal::InvalidToken)?;
                let keys = keys.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
                keys.get(&kid).ok_or(Refusal::InvalidToken)?.decode(token)
            }
        }?;
        if claims.exp.saturating_sub(claims.iat) > jwt.max_lifetime {
            return Err(Refusal::InvalidToken);
        }
        // A token with an unknown role is refused whole rather than trimmed.
        Roles::parse(claims.roles.iter().map(String::as_str)).map_err(|_| Refusal::InvalidToken)
    }

    /// Re-reads `AUTH_JWKS_FILE` every `JWKS_POLL` and on SIGHUP, and uses
    /// the new key set once it parses (a bad file keeps the last good set).
    /// Returns at once without a key set file.
    pub async fn follow_key_set(&self) {
        let Some(JwtKeys::Set { path, template, keys }) = self.jwt.as_ref().map(|jwt| &jwt.keys) else {
            return;
        };
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut poll = tokio::time::interval(JWKS_POLL);
        // What the file held when last read: only a change is parsed (and a bad one logged once).
        let mut seen = tokio::fs::read_to_string(path).await.unwrap_or_default();
        let mut unreadable = false;
        loop {
            tokio::select! {
                _ = poll.tick() => {}
                Some(()) = async { hangups.as_mut()?.recv().await } => {}
            }
            let text = match tokio::fs::read_to_string(path).await {
                Ok(text) => text,
                Err(error) => {
                    if !unreadable {
                        tracing::warn!(%error, path = %path.display(), "cannot read AUTH_JWKS_FILE; keeping its last keys");
                    }
                    unreadable = true;
                    continue;
                }
            };
            unreadable = false;
            if text == seen {
                continue;
            }
            match parse_key_set(&text, template) {
                Ok(set) => {
                    metrics::counter!("readthrough_auth_key_set_reads_total", "outcome" => "used").increment(1);
                    let kids: Vec<&String> = set.keys().collect();
                    tracing::info!(path = %path.display(), ?kids, "AUTH_JWKS_FILE changed: using its keys");
                    *keys.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(set);
                }
                Err(error) => {
                    metrics::counter!("readthrough_auth_key_set_reads_total", "outcome" => "refused").increment(1);
                    tracing::error!(
                        error = format!("{error:#}"),
                        path = %path.display(),
                        "AUTH_JWKS_FILE changed but is not a usable key set; keeping its last keys"
                    );
                }
            }
            seen = text;
        }
    }

    /// Compares the token's hash with every listed hash, each in constant
    /// time and without stopping at a match, so timing tells nothing about
    /// which bytes or which entry matched.
    fn static_roles(&self, token: &str) -> Option<Roles> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.static_tokens.iter().fold(None, |found, entry| {
            if same_digest(&entry.sha256, &digest) {
                Some(entry.roles)
            } else {
                found
            }
        })
    }
}

/// Reads `AUTH_TOKENS_FILE`: one token per line, `<sha256 hex> <roles>`, where
/// roles are comma-separated; `#` starts a comment. Make an entry with
/// `printf %s "$TOKEN" | sha256sum`.
fn read_tokens_file(path: &Path) -> anyhow::Result<Vec<StaticToken>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading AUTH_TOKENS_FILE {}", path.display()))?;
    let mut tokens = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let parsed =
            parse_token_line(line).map_err(|error| anyhow::anyhow!("{}:{}: {error}", path.display(), number + 1))?;
        tokens.push(parsed);
    }
    Ok(tokens)
}

fn parse_token_line(line: &str) -> Result<StaticToken, String> {
    let mut words = line.split_whitespace();
    let (Some(hash), Some(roles), None) = (words.next(), words.next(), words.next()) else {
        return Err("expected `<sha256 hex of the token> <roles, comma-separated>`".to_string());
    };
    let mut sha256 = [0u8; 32];
    if hash.len() != 64 {
        return Err("the hash must be 64 hex digits (SHA-256 of the token)".to_string());
    }
    for (byte, pair) in sha256.iter_mut().zip(hash.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| "the hash must be hex".to_string())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| "the hash must be hex".to_string())?;
    }
    let roles = Roles::parse(roles.split(','))?;
    Ok(StaticToken { sha256, roles })
}

impl VerifyingKey {
    fn decode(&self, token: &str) -> Result<Claims, Refusal> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|_| Refusal::InvalidToken)
    }
}

/// What every JWT must satisfy, whatever its key: `exp` and `iat` present,
/// `nbf` checked, and the configured issuer and audience named.
fn validation(config: &AuthConfig) -> Validation {
    let mut validation = Validation::default();
    // The library checks `iss` and `aud` only when present, unless required.
    let mut required = vec!["exp", "iat"];
    validation.leeway = 30;
    validation.validate_nbf = true;
    if let Some(issuer) = &config.auth_jwt_issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &config.auth_jwt_audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// `template`, accepting only `algorithm`: a token's header cannot choose
/// another (the algorithm confusion attack).
fn for_algorithm(template: &Validation, algorithm: Algorithm) -> Validation {
    let mut validation = template.clone();
    validation.algorithms = vec![algorithm];
    validation
}

/// A JWK set (`{"keys": [...]}`) of public keys: RSA, EC P-256 or P-384, or
/// Ed25519, each with a `kid`. The algorithm is the key's `alg`, or what its
/// type implies. Symmetric (`oct`) keys are refused: a key set is public.
fn parse_key_set(text: &str, template: &Validation) -> anyhow::Result<KeySet> {
    let set: JwkSet = serde_json::from_str(text).context("not a JWK set (`{\"keys\": [...]}`)")?;
    let mut by_kid = HashMap::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        let kid = jwk
            .common
            .key_id
            .clone()
            .with_context(|| format!("key {index} has no `kid`"))?;
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(params) => match params.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => bail!("key `{kid}`: only the P-256 and P-384 curves are supported"),
            },
            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            AlgorithmParameters::OctetKey(_) => bail!("key `{kid}` is symmetric (`oct`): a key set holds public keys"),
            _ => bail!("key `{kid}` is of an unsupported type"),
        };
        let algorithm = match jwk.common.key_algorithm {
            Some(alg) => Algorithm::from_str(&alg.to_string()).with_context(|| format!("key `{kid}`: `alg` {alg}"))?,
            None => implied,
        };
        if matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            bail!("key `{kid}`: `alg` {algorithm:?} is symmetric: a key set holds public keys");
        }
        let key = DecodingKey::from_jwk(jwk).with_context(|| format!("key `{kid}`"))?;
        let validation = for_algorithm(template, algorithm);
        if by_kid.insert(kid.clone(), VerifyingKey { key, validation }).is_some() {
            bail!("two keys have the `kid` `{kid}`");
        }
    }
    if by_kid.is_empty() {
        bail!("the set has no keys");
    }
    Ok(by_kid)
}

/// An RSA (RS256) or EC P-256 (ES256) public key in PEM.
fn read_public_key(path: &Path) -> anyhow::Result<(DecodingKey, Algorithm)> {
    let pem = std::fs::read(path).with_context(|| format!("reading AUTH_JWT_PUBLIC_KEY_FILE {}", path.display()))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, Algorithm::ES256));
    }
    bail!(
        "AUTH_JWT_PUBLIC_KEY_FILE {} holds neither an RSA nor an EC public key in PEM",
        path.display()
    )
}

/// The tower layer: `None` lets every call through (no authentication configured).
#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Option<Arc<Authenticator>>,
}

impl AuthLayer {
    pub fn new(authenticator: Option<Authenticator>) -> Self {
        Self {
            authenticator: authenticator.map(Arc::new),
        }
    }

    /// Whether calls are checked at all.
    pub fn enabled(&self) -> bool {
        self.authenticator.is_some()
    }

    /// Follows `AUTH_JWKS_FILE` (see `Authenticator::follow_key_set`).
    pub async fn follow_key_set(&self) {
        if let Some(authenticator) = &self.authenticator {
            authenticator.follow_key_set().await;
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    authenticator: Option<Arc<Authenticator>>,
}

impl<S> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Some(authenticator) = &self.authenticator
            && let Err(refusal) = check(authenticator, &request)
        {
            metrics::counter!("readthrough_auth_refused_total", "reason" => refusal.label()).increment(1);
            return Either::Right(ready(Ok(refusal.status().into_http())));
        }
        Either::Left(self.inner.call(request))
    }
}

fn check(authenticator: &Authenticator, request: &http::Request<Body>) -> Result<(), Refusal> {
    let Access::Needs(role) = methods::of(request.uri().path()).access else {
        return Ok(());
    };
    let authorization = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
    let roles = authenticator.authenticate(authorization)?;
    if roles.contains(role) {
        Ok(())
    } else {
        Err(Refusal::MissingRole(role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_line(token: &str, roles: &str) -> String {
        let hex: String = Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{hex} {roles}")
    }

    #[test]
    fn static_tokens_grant_their_roles_only() {
        let authenticator = Authenticator {
            static_tokens: vec![
                parse_token_line(&token_line("reader-token", "read")).unwrap(),
                parse_token_line(&token_line("writer-token", "read,write")).unwrap(),
            ],
            jwt: None,
        };
        let reader = authenticator.authenticate(Some(b"Bearer reader-token")).unwrap();
        assert!(reader.contains(Role::Read) && !reader.contains(Role::Write) && !reader.contains(Role::Admin));
        let writer = authenticator.authenticate(Some(b"bearer writer-token")).unwrap();
        assert!(writer.contains(Role::Read) && writer.contains(Role::Write));
        assert_eq!(authenticator.authenticate(None), Err(Refusal::MissingToken));
        assert_eq!(
            authenticator.authenticate(Some(b"Basic reader-token")),
            Err(Refusal::MissingToken)
        );
        assert_eq!(authenticator.authenticate(Some(b"Bearer ")), Err(Refusal::MissingToken));
        assert_eq!(
            authenticator.authenticate(Some(b"Bearer reader-tokeN")),
            Err(Refusal::InvalidToken)
        );
        assert_eq!(
            authenticator.authenticate(Some(&[0xff, 0xfe])),
            Err(Refusal::MissingToken)
        );
    }

    #[test]
    fn token_lines_are_checked() {
        assert!(parse_token_line(&token_line("t", "read,admin")).is_ok());
        assert!(
            parse_token_line(&token_line("t", "reader"))
                .unwrap_err()
                .contains("unknown role")
        );
        assert!(parse_token_line("abc read").is_err());
        assert!(parse_token_line(&format!("{} read", "zz".repeat(32))).is_err());
        assert!(parse_token_line(&format!("{} read extra", "00".repeat(32))).is_err());
    }
}
