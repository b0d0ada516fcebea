//! Single sign-on by OpenID Connect: authorization code with PKCE.
//!
//! `GET /api/v1/auth/oidc/start` sends the browser to the issuer;
//! `GET /api/v1/auth/oidc/callback` checks what comes back and finishes with a
//! small same-origin page that sets the session cookie. The browser's session
//! cookie is SameSite=Strict, so it is not sent on the issuer's cross-site
//! redirect back: `state`, `nonce` and the PKCE verifier are kept
//! server-side, keyed by the digest of `state`, in PostgreSQL
//! (`storage::sso`), since the callback may reach another API replica than
//! the start did.
//! The same page (not a bare redirect) is needed because a Strict cookie set
//! on the end of a cross-site redirect chain would not be sent with a
//! redirect to `/`; a new same-origin navigation sends it.
//!
//! Identities are keyed by (issuer, subject). A first sign-in with a verified
//! email makes an account (`LLMGW_OIDC_AUTO_CREATE`); an existing password
//! account with that email is linked only when the issuer says
//! `email_verified` and the user re-enters the account's password
//! (`POST /api/v1/auth/oidc/link`); an unverified email never creates or takes
//! over an account. That pending link, with its count of passwords tried, is
//! kept in PostgreSQL too (`storage::sso`), keyed by the digest of the link
//! token and bound to the browser that signed in, so the password may reach
//! any replica.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::url::{form_urlencoded, Url};
use openidconnect::{
    AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken, IssuerUrl,
    Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use secrecy::{ExposeSecret, SecretString};
use storage::accounts::User;
use storage::domain::Email;
use storage::identities::Identity;
use storage::secrets::{sha256, SessionToken};
use storage::sso::{SsoLink, SsoPending};

use crate::error::{error_chain, ApiError};
use crate::handlers::auth::{session_expiry, NewSession};
use crate::throttle::client_ip;
use crate::State;

/// How long a started sign-in may take at the issuer.
const PENDING_TTL: Duration = Duration::from_secs(10 * 60);
/// Sign-ins in progress at once, over all replicas: an anonymous flood of
/// `start` is refused past this (503 `busy`), never grows the table.
const PENDING_MAX: u32 = 10_000;
/// How long the password form for linking an account stays valid.
const LINK_TTL: Duration = Duration::from_secs(10 * 60);
/// Links waiting for a password at once, over all replicas (each needs a
/// sign-in at the issuer): past this a callback answers 503 `busy`.
const LINK_MAX: u32 = 1_000;
/// Passwords one pending link takes, counted over all replicas; a wrong
/// last one drops it.
const LINK_ATTEMPTS: u16 = 3;
/// The discovery document and JWKS are fetched on first use and kept this long.
const METADATA_TTL: Duration = Duration::from_secs(15 * 60);
/// A link form holds an id and a password: nothing bigger is read.
const LINK_BODY_MAX: usize = 8 * 1024;
/// Longest `login_hint` passed on to the issuer.
const LOGIN_HINT_MAX: usize = 320;

/// `LLMGW_OIDC_*` settings.
#[derive(Clone)]
pub struct OidcConfig {
    /// `LLMGW_OIDC_ISSUER`.
    pub issuer: String,
    /// `LLMGW_OIDC_CLIENT_ID`.
    pub client_id: String,
    /// `LLMGW_OIDC_CLIENT_SECRET` (absent for a public client: PKCE alone).
    pub client_secret: Option<SecretString>,
    /// `LLMGW_PUBLIC_URL`, without a trailing `/`: the redirect URI is
    /// `{public_url}/api/v1/auth/oidc/callback`.
    pub public_url: String,
    /// `LLMGW_OIDC_AUTO_CREATE`: a first sign-in with a verified email makes an account.
    pub auto_create: bool,
    /// `LLMGW_OIDC_CA_FILE`: extra PEM roots for the issuer's TLS.
    pub ca_file: Option<PathBuf>,
    /// Connect and whole-request timeout towards the issuer.
    pub timeout: Duration,
}

impl std::fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("public_url", &self.public_url)
            .field("auto_create", &self.auto_create)
            .finish_non_exhaustive()
    }
}

/// Settings compare by value (configuration tests); the secret is compared
/// like any other field, never printed.
impl PartialEq for OidcConfig {
    fn eq(&self, o: &Self) -> bool {
        use secrecy::ExposeSecret;
        self.issuer == o.issuer
            && self.client_id == o.client_id
            && self
                .client_secret
                .as_ref()
                .map(|s| s.expose_secret().to_owned())
                == o.client_secret
                    .as_ref()
                    .map(|s| s.expose_secret().to_owned())
            && self.public_url == o.public_url
            && self.auto_create == o.auto_create
            && self.ca_file == o.ca_file
            && self.timeout == o.timeout
    }
}

/// How people sign in.
#[derive(Debug, Clone, PartialEq)]
pub struct SsoConfig {
    /// `LLMGW_PASSWORD_LOGIN`: false answers 403 `password_login_disabled`
    /// on login and signup.
    pub password_login: bool,
    pub oidc: Option<OidcConfig>,
}

impl Default for SsoConfig {
    fn default() -> Self {
        Self {
            password_login: true,
            oidc: None,
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct SsoConfigError {
    pub var: &'static str,
    pub message: String,
}

/// Binds a sign-in to the browser that started it, so a callback URL
/// passed to someone else cannot sign them in to the sender's account
/// (login CSRF). SameSite=Lax, unlike the session cookie, so it comes back
/// on the issuer's top-level redirect; scoped to the SSO routes.
const BROWSER_COOKIE: &str = "llmgw_oidc";

/// The browser id cookie, kept for `max_age`: a sign-in's start sets it for
/// [`PENDING_TTL`], a link form again for [`LINK_TTL`], since the password
/// must come from the same browser.
fn browser_cookie(value: &str, secure: bool, max_age: Duration) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{BROWSER_COOKIE}={value}; HttpOnly; SameSite=Lax; Path=/api/v1/auth/oidc; Max-Age={}{secure}",
        max_age.as_secs()
    )
}

/// A browser id we made: 48 alphanumerics after the prefix.
fn valid_browser_id(v: &str) -> bool {
    v.len() <= 64 && v.len() >= 48 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The running single sign-on: settings and the issuer's client (flows in
/// progress are in the database).
pub(crate) struct Sso {
    pub password_login: bool,
    pub oidc: Option<Oidc>,
}

impl Sso {
    pub fn disabled() -> Self {
        Self {
            password_login: true,
            oidc: None,
        }
    }

    pub fn new(cfg: SsoConfig) -> Result<Self, SsoConfigError> {
        Ok(Self {
            password_login: cfg.password_login,
            oidc: cfg.oidc.map(Oidc::new).transpose()?,
        })
    }

    fn oidc(&self) -> Result<&Oidc, ApiError> {
        self.oidc.as_ref().ok_or(ApiError::SsoNotConfigured)
    }
}

pub(crate) struct Oidc {
    cfg: OidcConfig,
    issuer: IssuerUrl,
    redirect: RedirectUrl,
    secure_cookie: bool,
    /// The issuer is the operator's choice, so this is a plain client, not
    /// the SSRF-guarded one providers get; redirects are not followed.
    http: reqwest::Client,
    metadata: tokio::sync::Mutex<Option<(Instant, CoreProviderMetadata)>>,
}

impl Oidc {
    fn new(cfg: OidcConfig) -> Result<Self, SsoConfigError> {
        let issuer = IssuerUrl::new(cfg.issuer.clone()).map_err(|e| SsoConfigError {
            var: "LLMGW_OIDC_ISSUER",
            message: format!("not a URL ({e})"),
        })?;
        let public_url = cfg.public_url.trim_end_matches('/').to_owned();
        let redirect = RedirectUrl::new(format!("{public_url}/api/v1/auth/oidc/callback"))
            .map_err(|e| SsoConfigError {
                var: "LLMGW_PUBLIC_URL",
                message: format!("not a URL ({e})"),
            })?;
        let mut http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout);
        if let Some(path) = &cfg.ca_file {
            let ca_error = |message: String| SsoConfigError {
                var: "LLMGW_OIDC_CA_FILE",
                message,
            };
            let pem = std::fs::read(path)
                .map_err(|e| ca_error(format!("cannot read {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ca_error(format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(ca_error(format!("{} holds no certificate", path.display())));
            }
            for c in certs {
                http = http.add_root_certificate(c);
            }
        }
        let http = http.build().map_err(|e| SsoConfigError {
            var: "LLMGW_OIDC_ISSUER",
            message: format!("cannot build the HTTP client: {e}"),
        })?;
        Ok(Self {
            secure_cookie: public_url.starts_with("https://"),
            cfg: OidcConfig { public_url, ..cfg },
            issuer,
            redirect,
            http,
            metadata: tokio::sync::Mutex::new(None),
        })
    }

    /// The discovery document with its JWKS, fetched on first use and kept
    /// for [`METADATA_TTL`]; `refresh` fetches again (keys rotated).
    async fn metadata(&self, refresh: bool) -> Result<CoreProviderMetadata, Page> {
        let mut cached = self.metadata.lock().await;
        if let Some((at, m)) = cached.as_ref() {
            if !refresh && at.elapsed() < METADATA_TTL {
                return Ok(m.clone());
            }
        }
        let m = CoreProviderMetadata::discover_async(self.issuer.clone(), &self.http)
            .await
            .map_err(|e| {
                tracing::warn!(error = %error_chain(&e), issuer = %self.cfg.issuer, "OIDC discovery failed");
                Page::error(
                    StatusCode::BAD_GATEWAY,
                    "The identity provider cannot be reached",
                    "Its discovery document or keys could not be fetched. Try again shortly.",
                )
            })?;
        *cached = Some((Instant::now(), m.clone()));
        Ok(m)
    }

    fn client(
        &self,
        m: CoreProviderMetadata,
    ) -> openidconnect::core::CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    > {
        CoreClient::from_provider_metadata(
            m,
            ClientId::new(self.cfg.client_id.clone()),
            self.cfg
                .client_secret
                .as_ref()
                .map(|s| ClientSecret::new(s.expose_secret().to_owned())),
        )
        .set_redirect_uri(self.redirect.clone())
    }
}

/// A small HTML answer: what a browser shows at the end of a redirect.
/// No script, no external resources.
pub(crate) struct Page {
    status: StatusCode,
    title: String,
    body: String,
    refresh_to_root: bool,
    cookie: Option<String>,
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

impl Page {
    fn error(status: StatusCode, title: &str, message: &str) -> Self {
        Self {
            status,
            title: title.to_owned(),
            body: format!(
                "<p>{}</p>\n<p><a href=\"/\">Back to llmgw</a></p>",
                escape(message)
            ),
            refresh_to_root: false,
            cookie: None,
        }
    }

    fn signed_in(state: &State, session: &NewSession) -> Self {
        Self {
            status: StatusCode::OK,
            title: "Signed in".to_owned(),
            body: format!(
                "<p>Signed in as {}. <a href=\"/\">Continue to llmgw</a>.</p>",
                escape(&session.user.email)
            ),
            refresh_to_root: true,
            cookie: Some(crate::browser::set_cookie(
                &state.cfg.browser,
                &session.token,
                state.cfg.session_ttl.as_secs().min(i64::MAX as u64) as i64,
            )),
        }
    }

    fn link_form(status: StatusCode, link_id: &str, email: &str, note: Option<&str>) -> Self {
        let note = note
            .map(|n| format!("<p role=\"alert\">{}</p>\n", escape(n)))
            .unwrap_or_default();
        Self {
            status,
            title: "Link your account".to_owned(),
            body: format!(
                "{note}<p>An account with the email {email} already exists. To sign in to it \
                 with single sign-on from now on, enter its password once.</p>\n\
                 <form method=\"post\" action=\"/api/v1/auth/oidc/link\">\n\
                 <input type=\"hidden\" name=\"link_id\" value=\"{link}\">\n\
                 <label>Password <input type=\"password\" name=\"password\" \
                 autocomplete=\"current-password\" required></label>\n\
                 <button type=\"submit\">Link and sign in</button>\n</form>",
                email = escape(email),
                link = escape(link_id),
            ),
            refresh_to_root: false,
            cookie: None,
        }
    }

    fn into_response(self) -> HttpResponse {
        let refresh = if self.refresh_to_root {
            "<meta http-equiv=\"refresh\" content=\"0;url=/\">\n"
        } else {
            ""
        };
        let html = format!(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n{refresh}\
             <title>{title} · llmgw</title>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n{body}\n\
             </main>\n</body>\n</html>\n",
            title = escape(&self.title),
            body = self.body,
        );
        let mut res = HttpResponse::build(self.status);
        res.insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            // The callback URL carries the code: never in a Referer.
            .insert_header((header::REFERRER_POLICY, "no-referrer"))
            .insert_header((
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ))
            .insert_header((header::X_FRAME_OPTIONS, "DENY"));
        if let Some(c) = self.cookie {
            res.insert_header((header::SET_COOKIE, c));
        }
        res.body(html)
    }
}

impl From<ApiError> for Page {
    fn from(e: ApiError) -> Self {
        let status = actix_web::ResponseError::status_code(&e);
        if status.is_server_error() {
            tracing::error!(error = %error_chain(&e), "single sign-on failed");
        }
        let message = match &e {
            ApiError::Internal(_) => "Something went wrong on the server. Try again.".to_owned(),
            e => e.to_string(),
        };
        Page::error(status, "Sign-in failed", &message)
    }
}

fn query_pairs(raw: &str) -> HashMap<String, String> {
    // A repeated parameter is refused by keeping neither copy.
    let mut out = HashMap::new();
    let mut repeated = Vec::new();
    for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
        if out.insert(k.to_string(), v.into_owned()).is_some() {
            repeated.push(k.into_owned());
        }
    }
    for k in repeated {
        out.remove(&k);
    }
    out
}

/// `GET /api/v1/auth/oidc/start[?login_hint=…]`: 302 to the issuer.
pub async fn start(state: web::Data<State>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let oidc = state.sso.oidc()?;
    // Each start holds an entry for minutes: an address gets the login budget.
    state
        .throttle
        .check_address(client_ip(&req, &state.cfg.trusted_proxies))?;
    let query = query_pairs(req.query_string());
    let hint = match query.get("login_hint") {
        Some(h) if h.is_empty() || h.len() > LOGIN_HINT_MAX => {
            return Err(ApiError::field(
                "login_hint",
                format!("must be 1 to {LOGIN_HINT_MAX} characters"),
            ))
        }
        h => h.cloned(),
    };
    let metadata = match oidc.metadata(false).await {
        Ok(m) => m,
        Err(page) => return Ok(page.into_response()),
    };
    let client = oidc.client(metadata);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut auth = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scope(Scope::new("email".to_owned()))
        .add_scope(Scope::new("profile".to_owned()))
        .set_pkce_challenge(challenge);
    if let Some(h) = &hint {
        auth = auth.add_extra_param("login_hint", h.clone());
    }
    let (url, csrf, nonce): (Url, CsrfToken, Nonce) = auth.url();
    // Sign-ins started in several tabs of one browser share its id.
    let browser = crate::browser::cookie(&req, BROWSER_COOKIE)
        .filter(|v| valid_browser_id(v))
        .map_or_else(
            || SessionToken::generate().expose_secret().to_owned(),
            str::to_owned,
        );
    let pending = SsoPending {
        nonce: nonce.secret().clone(),
        pkce_verifier: verifier.secret().clone(),
        browser_digest: sha256(&browser),
    };
    if !state
        .db
        .insert_sso_pending(&sha256(csrf.secret()), &pending, PENDING_TTL, PENDING_MAX)
        .await?
    {
        return Err(ApiError::Busy);
    }
    Ok(HttpResponse::Found()
        .insert_header((header::LOCATION, url.as_str()))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((
            header::SET_COOKIE,
            browser_cookie(&browser, oidc.secure_cookie, PENDING_TTL),
        ))
        .finish())
}

/// `GET /api/v1/auth/oidc/callback?code&state`: the issuer's answer.
/// Without OIDC configured it answers the API's JSON 404, like `start`.
pub async fn callback(state: web::Data<State>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    state.sso.oidc()?;
    Ok(match finish(&state, &req).await {
        Ok(page) | Err(page) => page.into_response(),
    })
}

async fn finish(state: &State, req: &HttpRequest) -> Result<Page, Page> {
    let oidc = state.sso.oidc()?;
    let query = query_pairs(req.query_string());
    let db_err = |e: storage::StorageError| Page::from(ApiError::from(e));
    // Whatever the issuer said, a state is used once.
    let pending = match query.get("state") {
        Some(s) => state
            .db
            .take_sso_pending(&sha256(s))
            .await
            .map_err(db_err)?,
        None => None,
    };
    if let Some(err) = query.get("error") {
        // Anyone can craft this URL: what is shown of it stays short.
        let short = |v: &str| v.chars().take(200).collect::<String>();
        let err = short(err);
        let detail = query
            .get("error_description")
            .map(|d| format!(" ({})", short(d)))
            .unwrap_or_default();
        return Err(Page::error(
            StatusCode::BAD_REQUEST,
            "Sign-in was not completed",
            &format!("The identity provider answered: {err}{detail}."),
        ));
    }
    let Some(pending) = pending else {
        return Err(Page::error(
            StatusCode::BAD_REQUEST,
            "Sign-in expired",
            "This sign-in is unknown, was already used or has expired. Start again.",
        ));
    };
    let browser = crate::browser::cookie(req, BROWSER_COOKIE);
    if browser.map(sha256) != Some(pending.browser_digest) {
        return Err(Page::error(
            StatusCode::BAD_REQUEST,
            "Sign-in started elsewhere",
            "This sign-in was started in another browser. Start again here.",
        ));
    }
    // Checked equal to what the start kept, hence one of ours.
    let browser = browser.unwrap_or_default().to_owned();
    let Some(code) = query.get("code") else {
        return Err(Page::error(
            StatusCode::BAD_REQUEST,
            "Sign-in was not completed",
            "The identity provider sent no authorization code.",
        ));
    };

    let metadata = oidc.metadata(false).await?;
    let client = oidc.client(metadata);
    let refused = |what: &str| {
        Page::error(
            StatusCode::BAD_REQUEST,
            "Sign-in refused",
            &format!("{what} Start again."),
        )
    };
    let tokens = client
        .exchange_code(AuthorizationCode::new(code.clone()))
        .map_err(|_| refused("The identity provider has no token endpoint."))?
        .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier))
        .request_async(&oidc.http)
        .await
        .map_err(|e| {
            tracing::warn!(error = %error_chain(&e), "OIDC code exchange failed");
            refused("The identity provider did not accept the sign-in.")
        })?;
    let id_token = tokens
        .id_token()
        .ok_or_else(|| refused("The identity provider sent no ID token."))?;
    let nonce = Nonce::new(pending.nonce);
    let claims = match id_token.claims(&client.id_token_verifier(), &nonce) {
        Ok(c) => c.clone(),
        // The issuer may have rotated its keys since they were fetched.
        Err(ClaimsVerificationError::SignatureVerification(_)) => {
            let client = oidc.client(oidc.metadata(true).await?);
            let verified = id_token
                .claims(&client.id_token_verifier(), &nonce)
                .cloned();
            verified.map_err(|e| {
                tracing::warn!(error = %e, "OIDC ID token refused");
                refused("The identity token could not be verified.")
            })?
        }
        Err(e) => {
            tracing::warn!(error = %e, "OIDC ID token refused");
            return Err(refused("The identity token could not be verified."));
        }
    };

    let email = claims.email().map(|e| e.as_str().to_owned());
    let identity = Identity {
        issuer: claims.issuer().as_str(),
        subject: claims.subject().as_str(),
        email: email.as_deref(),
    };
    if let Some(user) = state.db.user_by_identity(&identity).await.map_err(db_err)? {
        let session = crate::handlers::auth::start_session(state, user).await?;
        return Ok(Page::signed_in(state, &session));
    }

    let verified = claims.email_verified() == Some(true);
    let Some(raw_email) = email.as_deref() else {
        return Err(Page::error(
            StatusCode::FORBIDDEN,
            "No email address",
            "The identity provider did not share an email address, so no account can be matched or created.",
        ));
    };
    if !verified {
        return Err(Page::error(
            StatusCode::FORBIDDEN,
            "Email address not verified",
            &format!(
                "The identity provider has not verified {raw_email}, so it cannot sign in to or create an account. Verify the address with the identity provider, then try again."
            ),
        ));
    }
    let email = Email::parse(raw_email).map_err(|_| {
        Page::error(
            StatusCode::FORBIDDEN,
            "Unusable email address",
            "The email address the identity provider gave is not one llmgw accepts.",
        )
    })?;
    match state.db.user_by_email(&email).await {
        Ok(user) => {
            let link_id = SessionToken::generate().expose_secret().to_owned();
            let link = SsoLink {
                user_id: user.id,
                issuer: identity.issuer.to_owned(),
                subject: identity.subject.to_owned(),
                email: user.email,
                browser_digest: pending.browser_digest,
            };
            if !state
                .db
                .insert_sso_link(&sha256(&link_id), &link, LINK_TTL, LINK_MAX)
                .await
                .map_err(db_err)?
            {
                return Err(ApiError::Busy.into());
            }
            let mut page = Page::link_form(StatusCode::OK, &link_id, &link.email, None);
            page.cookie = Some(browser_cookie(&browser, oidc.secure_cookie, LINK_TTL));
            Ok(page)
        }
        Err(storage::StorageError::NotFound) if !oidc.cfg.auto_create => Err(Page::error(
            StatusCode::FORBIDDEN,
            "No account",
            "There is no llmgw account for this email address, and this server does not create accounts on single sign-on. Ask an administrator for an invitation.",
        )),
        Err(storage::StorageError::NotFound) => {
            create_account(state, &email, &identity).await
        }
        Err(e) => Err(db_err(e)),
    }
}

async fn create_account(
    state: &State,
    email: &Email,
    identity: &Identity<'_>,
) -> Result<Page, Page> {
    // users.password_hash is NOT NULL: the hash of a secret thrown away at
    // once, so password login can never succeed for this account.
    let unusable = SecretString::from(SessionToken::generate().expose_secret().to_owned());
    let hash = state
        .passwords
        .reserve()
        .map_err(ApiError::from)?
        .hash(unusable)
        .await
        .map_err(ApiError::from)?;
    let token = SessionToken::generate();
    let expires_at = session_expiry(state)?;
    let user = state
        .db
        .create_sso_user_with_session(email, &hash, identity, &token.digest(), expires_at)
        .await
        .map_err(ApiError::from)?;
    let session = NewSession {
        token: token.expose_secret().to_owned(),
        expires_at,
        user,
    };
    Ok(Page::signed_in(state, &session))
}

/// `POST /api/v1/auth/oidc/link` (form: `link_id`, `password`): links the
/// pending identity to the account once its password is re-entered.
pub async fn link(
    state: web::Data<State>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    use futures_util::StreamExt as _;
    state.sso.oidc()?;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::BadRequest("the request body could not be read".into()))?;
        if body.len() + chunk.len() > LINK_BODY_MAX {
            return Err(ApiError::PayloadTooLarge(LINK_BODY_MAX));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(match link_inner(&state, &req, &body).await {
        Ok(page) | Err(page) => page.into_response(),
    })
}

async fn link_inner(state: &State, req: &HttpRequest, body: &[u8]) -> Result<Page, Page> {
    state.sso.oidc()?;
    state
        .throttle
        .check_address(client_ip(req, &state.cfg.trusted_proxies))?;
    let mut link_id = None;
    let mut password = None;
    for (k, v) in form_urlencoded::parse(body) {
        match k.as_ref() {
            "link_id" => link_id = Some(v.into_owned()),
            "password" => password = Some(SecretString::from(v.into_owned())),
            _ => {}
        }
    }
    let expired = || {
        Page::error(
            StatusCode::BAD_REQUEST,
            "Link expired",
            "This account link is unknown, was already used or has expired. Sign in with single sign-on again.",
        )
    };
    let db_err = |e: storage::StorageError| Page::from(ApiError::from(e));
    let link_id = link_id.ok_or_else(expired)?;
    let link_digest = sha256(&link_id);
    // Before any lookup, so a busy server refuses at no cost; refusals of
    // the server's own (busy, throttled) cost no attempt either.
    let slot = state.passwords.reserve().map_err(ApiError::from)?;
    let Some(link) = state
        .db
        .sso_link(&link_digest, LINK_ATTEMPTS)
        .await
        .map_err(db_err)?
    else {
        return Err(expired());
    };
    let Some(browser_digest) = crate::browser::cookie(req, BROWSER_COOKIE)
        .map(sha256)
        .filter(|d| *d == link.browser_digest)
    else {
        return Err(Page::error(
            StatusCode::BAD_REQUEST,
            "Link started elsewhere",
            "This account link belongs to another browser. Sign in with single sign-on again here.",
        ));
    };
    let Some(password) = password.filter(|p| !p.expose_secret().is_empty()) else {
        return Err(Page::link_form(
            StatusCode::UNPROCESSABLE_ENTITY,
            &link_id,
            &link.email,
            Some("Enter the account's password."),
        ));
    };
    state.throttle.check_email(&link.email)?;
    let Some(attempts) = state
        .db
        .count_sso_link_attempt(&link_digest, &browser_digest, LINK_ATTEMPTS)
        .await
        .map_err(db_err)?
    else {
        return Err(expired());
    };
    let email = Email::parse(&link.email).map_err(|_| expired())?;
    let creds = state
        .db
        .user_credentials(&email)
        .await
        .map_err(ApiError::from)?
        .filter(|c| c.id == link.user_id);
    let ok = slot
        .verify(creds.map(|c| c.password_hash), password)
        .await
        .map_err(ApiError::from)?;
    if !ok {
        if attempts >= LINK_ATTEMPTS {
            state
                .db
                .delete_sso_link(&link_digest)
                .await
                .map_err(db_err)?;
            return Err(Page::error(
                StatusCode::UNAUTHORIZED,
                "Wrong password",
                "The password was wrong too many times. Sign in with single sign-on again to retry.",
            ));
        }
        return Err(Page::link_form(
            StatusCode::UNAUTHORIZED,
            &link_id,
            &link.email,
            Some("Wrong password. Try again."),
        ));
    }
    let token = SessionToken::generate();
    let expires_at = session_expiry(state)?;
    // Two right passwords racing: one deletes the row, the other finds none.
    let Some(linked) = state
        .db
        .complete_sso_link(&link_digest, &browser_digest, &token.digest(), expires_at)
        .await
        .map_err(db_err)?
    else {
        return Err(expired());
    };
    let session = NewSession {
        token: token.expose_secret().to_owned(),
        expires_at,
        user: User {
            id: linked.user_id,
            email: linked.email,
        },
    };
    Ok(Page::signed_in(state, &session))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_the_issuer_sends() {
        let p = Page::error(StatusCode::BAD_REQUEST, "t", "<script>x</script>");
        assert!(!p.body.contains("<script>"));
    }
}
