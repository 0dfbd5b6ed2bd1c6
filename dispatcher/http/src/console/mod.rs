//! The web console: pages over the state the API serves, for a browser
//! signed in with an API token (see [`session`]). Pages are rendered on the
//! server with minijinja, every value HTML-escaped; the one stylesheet is
//! embedded in the binary, and every page is sent with a
//! Content-Security-Policy that allows no inline script or style and
//! nothing from another origin.
//!
//! An account token sees only its account, as through the API: another
//! account's pages answer 404.

mod chain_page;
mod health;
mod letters;
mod new_chain;
mod records;
mod run;
mod scripts;
pub mod session;
mod tail;
mod versions;

use std::sync::LazyLock;

use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::{Environment, context};
use serde::Deserialize;
use serde_json::Value;
use switchboard_sdk::{AccountKey, format_rfc3339};

use crate::api::ApiState;
use crate::auth::Principal;
use session::{SESSION_COOKIE, SESSION_TTL, SIGN_IN_COOKIE, Session, random_token, same_token};

/// What every console response may load: its own stylesheet and scripts.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; script-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

static PAGES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("sign_in.html", include_str!("templates/sign_in.html")),
        ("accounts.html", include_str!("templates/accounts.html")),
        ("account.html", include_str!("templates/account.html")),
        ("run.html", include_str!("templates/run.html")),
        ("error.html", include_str!("templates/error.html")),
        (
            "dead_letters.html",
            include_str!("templates/dead_letters.html"),
        ),
        ("contacts.html", include_str!("templates/contacts.html")),
        ("messages.html", include_str!("templates/messages.html")),
        ("unmatched.html", include_str!("templates/unmatched.html")),
        ("scripts.html", include_str!("templates/scripts.html")),
        ("script.html", include_str!("templates/script.html")),
        ("new_chain.html", include_str!("templates/new_chain.html")),
        ("tail.html", include_str!("templates/tail.html")),
        ("versions.html", include_str!("templates/versions.html")),
        ("chain.html", include_str!("templates/chain.html")),
        ("health.html", include_str!("templates/health.html")),
    ] {
        env.add_template(name, source)
            .expect("the console's templates compile");
    }
    env
});

/// The console's routes, to merge into the API's router.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(home))
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-in/{code}", get(sign_in_link))
        .route("/console/sign-out", post(sign_out))
        .route("/console/health", get(health::page))
        .route("/console/accounts/{account}", get(account_page))
        .route("/console/accounts/{account}/events", get(run::find_event))
        .route(
            "/console/accounts/{account}/events/{id}",
            get(run::run_page),
        )
        .route(
            "/console/accounts/{account}/events/{id}/rerun",
            post(run::rerun),
        )
        .route(
            "/console/accounts/{account}/dead-letters",
            get(letters::page),
        )
        .route(
            "/console/accounts/{account}/contacts",
            get(records::contacts),
        )
        .route(
            "/console/accounts/{account}/messages",
            get(records::messages),
        )
        .route(
            "/console/accounts/{account}/messages/unmatched",
            get(records::unmatched),
        )
        .route(
            "/console/accounts/{account}/chains/new",
            get(new_chain::page).post(new_chain::act),
        )
        .route(
            "/console/accounts/{account}/chain/{name}",
            get(chain_page::page).post(chain_page::act),
        )
        .route(
            "/console/accounts/{account}/chain/{name}/steps/add",
            get(chain_page::add_page).post(chain_page::add_act),
        )
        .route(
            "/console/accounts/{account}/chain/{name}/steps/{index}",
            get(chain_page::step_page).post(chain_page::step_act),
        )
        .route(
            "/console/accounts/{account}/chains/versions",
            get(versions::page),
        )
        .route(
            "/console/accounts/{account}/chains/versions/{version}/restore",
            post(versions::restore),
        )
        .route("/console/accounts/{account}/tail", get(tail::page))
        .route("/console/accounts/{account}/tail/stream", get(tail::stream))
        .route("/console/accounts/{account}/scripts", get(scripts::list))
        .route(
            "/console/accounts/{account}/scripts/{name}",
            get(scripts::edit).post(scripts::act),
        )
        .route(
            "/console/accounts/{account}/dead-letters/groups",
            post(letters::act),
        )
        .route(
            "/console/accounts/{account}/dead-letters/range",
            post(letters::act_on_range),
        )
        .route(
            "/console/accounts/{account}/dead-letters/{id}/replay",
            post(run::replay),
        )
        .route("/console/static/console.css", get(stylesheet))
        .route("/console/static/new-chain.js", get(new_chain_script))
        .route("/console/static/tail.js", get(tail_script))
        .layer(axum::middleware::map_response(secure_headers))
}

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn new_chain_script() -> Response {
    script(include_str!("static/new-chain.js"))
}

async fn tail_script() -> Response {
    script(include_str!("static/tail.js"))
}

fn script(source: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        source,
    )
        .into_response()
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("static/console.css"),
    )
        .into_response()
}

/// A page, or the page to show instead (sign-in, not found, refused).
type Page = Result<Response, Instead>;

/// The page shown instead of the one asked for.
struct Instead(Box<Response>);

impl From<Response> for Instead {
    fn from(response: Response) -> Self {
        Instead(Box::new(response))
    }
}

impl IntoResponse for Instead {
    fn into_response(self) -> Response {
        *self.0
    }
}

fn render(name: &str, ctx: minijinja::Value) -> Response {
    match PAGES.get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(template = name, error = %e, "rendering a console page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// A serialisable value for a template.
fn view(value: impl serde::Serialize) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(value))
}

fn error_page(status: StatusCode, session: Option<&Session>, message: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let mut response = render(
        "error.html",
        context! { title, message, session => session.map(session_view) },
    );
    *response.status_mut() = status;
    response
}

/// What the layout shows of a session.
fn session_view(session: &Session) -> minijinja::Value {
    let who = match &session.principal {
        Principal::Admin => "admin".to_string(),
        Principal::Account(a) => format!("account {a}"),
        Principal::Receiver(r) => format!("receiver {} of account {}", r.receiver, r.account),
    };
    context! { who, csrf => session.csrf.clone() }
}

/// The request's session, or a redirect to sign in: also when the token it
/// was started with has been revoked since (the session ends with it).
fn signed_in(s: &ApiState, headers: &HeaderMap) -> Result<Session, Instead> {
    let to_sign_in = || Redirect::to("/console/sign-in").into_response().into();
    let session = s.sessions.of(headers).ok_or_else(to_sign_in)?;
    match s.auth.holds(&session.credential) {
        Ok(true) => Ok(session),
        Ok(false) => {
            s.sessions.end(headers);
            Err(to_sign_in())
        }
        Err(e) => {
            tracing::error!(error = %e, "checking a console session's token failed");
            Err(error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "The session could not be checked; try again.",
            )
            .into())
        }
    }
}

/// The account a signed-in page is about, if the session reaches it: 404
/// otherwise, as the API answers.
fn reachable(session: &Session, account: &str) -> Result<AccountKey, Instead> {
    match AccountKey::new(account) {
        Ok(key) if session.principal.reaches(account) => Ok(key),
        _ => Err(error_page(
            StatusCode::NOT_FOUND,
            Some(session),
            &format!("There is no account {account:?} here."),
        )
        .into()),
    }
}

/// A request from a signed-in browser (else the sign-in page instead).
struct SignedIn(Session);

impl axum::extract::FromRequestParts<ApiState> for SignedIn {
    type Rejection = Instead;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &ApiState,
    ) -> Result<Self, Instead> {
        signed_in(s, &parts.headers).map(SignedIn)
    }
}

/// A request from a signed-in browser for a page of an account (the
/// route's `{account}`) its token reaches; another account is not found,
/// as in the API.
struct OnAccount {
    session: Session,
    key: AccountKey,
}

impl axum::extract::FromRequestParts<ApiState> for OnAccount {
    type Rejection = Instead;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &ApiState,
    ) -> Result<Self, Instead> {
        let session = signed_in(s, &parts.headers)?;
        let params = axum::extract::RawPathParams::from_request_parts(parts, s)
            .await
            .map_err(|e| Instead::from(e.into_response()))?;
        let account = params
            .iter()
            .find_map(|(name, value)| (name == "account").then_some(value))
            .unwrap_or_default();
        let key = reachable(&session, account)?;
        Ok(Self { session, key })
    }
}

/// Checks the CSRF token a form carried.
fn checked_form(session: &Session, csrf: &str) -> Result<(), Instead> {
    if same_token(&session.csrf, csrf) {
        Ok(())
    } else {
        Err(error_page(
            StatusCode::FORBIDDEN,
            Some(session),
            "The form was not sent from this console (its CSRF token is missing or wrong). \
             Reload the page and try again.",
        )
        .into())
    }
}

async fn home(State(s): State<ApiState>, SignedIn(session): SignedIn) -> Page {
    match &session.principal {
        Principal::Account(own) => {
            Ok(Redirect::to(&format!("/console/accounts/{own}")).into_response())
        }
        Principal::Receiver(_) => Err(error_page(
            StatusCode::FORBIDDEN,
            Some(&session),
            "A receiver token opens its receiver's inbox, not the console.",
        )
        .into()),
        Principal::Admin => {
            let accounts: Vec<String> = s
                .chains
                .accounts()
                .iter()
                .map(ToString::to_string)
                .collect();
            Ok(render(
                "accounts.html",
                context! { accounts, session => session_view(&session) },
            ))
        }
    }
}

async fn sign_in_page(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    if s.sessions.of(&headers).is_some() {
        return Redirect::to("/console").into_response();
    }
    sign_in_form(&s, StatusCode::OK, None)
}

/// The sign-in form with a fresh CSRF token, in its cookie too.
fn sign_in_form(s: &ApiState, status: StatusCode, error: Option<&str>) -> Response {
    let csrf = random_token();
    let mut response = render("sign_in.html", context! { csrf => csrf.clone(), error });
    *response.status_mut() = status;
    s.sessions.set_cookie(
        &mut response,
        SIGN_IN_COOKIE,
        &csrf,
        std::time::Duration::from_secs(3600),
    );
    response
}

#[derive(Deserialize)]
struct SignIn {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

async fn sign_in(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    let expected = session::cookie(&headers, SIGN_IN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !same_token(&expected, &form.csrf) {
        return sign_in_form(
            &s,
            StatusCode::FORBIDDEN,
            Some(
                "The form was not sent from this console (its CSRF token is missing or wrong): try again.",
            ),
        );
    }
    let principal = match s.auth.principal(form.token.trim()) {
        Ok(Some(Principal::Receiver(_))) => {
            return sign_in_form(
                &s,
                StatusCode::UNAUTHORIZED,
                Some(
                    "That is a receiver token: it opens one person's inbox, not the console. \
                     Sign in with the admin token or an account token.",
                ),
            );
        }
        Ok(Some(principal)) => principal,
        Ok(None) => {
            return sign_in_form(
                &s,
                StatusCode::UNAUTHORIZED,
                Some("That token is not the admin token or a live account token."),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "checking a console sign-in token failed");
            return sign_in_form(
                &s,
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("The token could not be checked; try again."),
            );
        }
    };
    signed_in_response(&s, principal, crate::auth::credential(form.token.trim()))
}

/// A sign-in link (see [`session::Sessions::sign_in_link`]): signs in and
/// goes to the console, once.
async fn sign_in_link(State(s): State<ApiState>, Path(code): Path<String>) -> Response {
    match s.sessions.redeem(&code) {
        Some((principal, credential)) => signed_in_response(&s, principal, credential),
        None => sign_in_form(
            &s,
            StatusCode::UNAUTHORIZED,
            Some("That sign-in link was used already or has expired: sign in with a token."),
        ),
    }
}

/// A new session for `principal`: its cookie, and the way to the console.
fn signed_in_response(
    s: &ApiState,
    principal: Principal,
    credential: crate::auth::Credential,
) -> Response {
    let id = s.sessions.start(principal, credential);
    let mut response = Redirect::to("/console").into_response();
    s.sessions
        .set_cookie(&mut response, SESSION_COOKIE, &id, SESSION_TTL);
    s.sessions
        .set_cookie(&mut response, SIGN_IN_COOKIE, "", std::time::Duration::ZERO);
    response
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    State(s): State<ApiState>,
    SignedIn(session): SignedIn,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Page {
    checked_form(&session, &form.csrf)?;
    s.sessions.end(&headers);
    let mut response = Redirect::to("/console/sign-in").into_response();
    s.sessions
        .set_cookie(&mut response, SESSION_COOKIE, "", std::time::Duration::ZERO);
    Ok(response)
}

/// How many dead letters the account page lists.
const LETTERS_SHOWN: usize = 50;

async fn account_page(State(s): State<ApiState>, OnAccount { session, key }: OnAccount) -> Page {
    let current = s.chains.current(&key).map_err(|e| internal(&session, &e))?;
    let version = current.as_ref().map(|v| v.version);
    let chains: Vec<Value> = current
        .iter()
        .flat_map(|v| &v.chains)
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "conversation_type": c.conversation_type.to_string(),
                "event_type": c.event_type.to_string(),
                "when": c.when(),
                "steps": c.steps.iter().map(|st| {
                    if st.step_name() == st.handler {
                        st.handler.clone()
                    } else {
                        format!("{} ({})", st.step_name(), st.handler)
                    }
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let letters: Vec<Value> = s
        .letters
        .list(key.as_str(), LETTERS_SHOWN)
        .map_err(|e| internal(&session, &e))?
        .iter()
        .map(|l| {
            serde_json::json!({
                "at": format_rfc3339(l.at),
                "event_id": l.event.as_ref().map(|e| e.id.to_string()),
                "event_type": l.event.as_ref().map(|e| format!("{} / {}", e.conversation_type, e.event_type)),
                "reason": format!("{:?}", l.reason),
                "chain": l.chain,
                "step": l.step,
                "error": l.error,
            })
        })
        .collect();
    Ok(render(
        "account.html",
        context! {
            account => key.as_str(),
            version,
            chains => view(&chains),
            letters => view(&letters),
            session => session_view(&session),
        },
    ))
}

/// A page the store failed: 503 with "try again in a moment" when the
/// failure is the shared state's and passing (as the API answers it,
/// [`crate::api::is_transient`]), else 500, saying so when a change may or
/// may not have been saved.
fn internal(session: &Session, e: &(dyn std::error::Error + 'static)) -> Response {
    if crate::api::is_transient(e) {
        tracing::warn!(error = %e, "a console page met a passing failure of the shared state");
        let mut page = error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(session),
            "The shared state cannot be reached just now (a replica taking over, a \
             leader election); try again in a moment.",
        );
        crate::api::retry_after(&mut page);
        return page;
    }
    tracing::error!(error = %e, "a console page could not read or write the store");
    let message = if crate::api::is_outcome_unknown(e) {
        "The change may or may not have been saved; reload to see before trying again."
    } else {
        "The store could not be read; try again."
    };
    error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(session), message)
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
    use switchboard_store::StoreError;

    use super::session::{SESSION_COOKIE, Sessions};
    use crate::auth::Principal;

    /// A page the shared state failed in passing answers 503 with
    /// `Retry-After` and asks to try again in a moment; a change that may or
    /// may not have been saved, and any other store failure, answer 500.
    #[tokio::test]
    async fn a_page_meeting_a_passing_store_failure_answers_503() {
        let sessions = Sessions::default();
        let id = sessions.start(Principal::Admin, [1; 32]);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={id}")).unwrap(),
        );
        let session = sessions.of(&headers).expect("the session");

        let moved = super::internal(&session, &StoreError::PartitionMoved { partition: 3 });
        assert_eq!(moved.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(moved.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(moved.into_body(), usize::MAX)
            .await
            .unwrap();
        let page = String::from_utf8(body.to_vec()).unwrap();
        assert!(page.contains("try again in a moment"), "{page}");

        let unknown = super::internal(
            &session,
            &StoreError::OutcomeUnknown {
                message: "no answer".into(),
            },
        );
        assert_eq!(unknown.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(unknown.headers().get(header::RETRY_AFTER).is_none());
        let body = axum::body::to_bytes(unknown.into_body(), usize::MAX)
            .await
            .unwrap();
        let page = String::from_utf8(body.to_vec()).unwrap();
        assert!(page.contains("may or may not have been saved"), "{page}");

        let disk = super::internal(&session, &std::io::Error::other("disk full"));
        assert_eq!(disk.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(disk.headers().get(header::RETRY_AFTER).is_none());
    }
}
