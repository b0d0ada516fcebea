//! The caller's own sessions.

use actix_web::{web, HttpResponse};

use crate::error::ApiError;
use crate::extract::Session;
use crate::State;

/// Signs out everywhere: every session of the caller ends, the one making
/// this request included (a stolen token stops working with the rest).
pub async fn sign_out_everywhere(
    state: web::Data<State>,
    session: Session,
) -> Result<HttpResponse, ApiError> {
    let ended = state.db.delete_user_sessions(session.user.id).await?;
    tracing::info!(user_id = %session.user.id, sessions = ended, "signed out everywhere");
    Ok(HttpResponse::NoContent().finish())
}
