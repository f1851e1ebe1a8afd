//! The OpenAPI description of the REST API, served at
//! `GET /api/v1/openapi.json` (no token needed).
//!
//! It is derived from the code: every route's `#[utoipa::path]` sits on its
//! handler in [`super::routes`], and the shapes of rooms, messages and
//! profiles are the `ToSchema` derives of the very types the handlers
//! serialize ([`crate::model`], [`crate::service::RoomSummary`]). The
//! envelopes that the handlers build with `json!` are described here, next
//! to the request bodies; schemathesis (`scripts/schemathesis.sh`) checks in
//! CI that what the service answers conforms to this description.
//!
//! Every `/api/v1/chat` operation also lists the error statuses of
//! PROTOCOL §4 with the one error shape ([`ErrorBody`]); they are added by
//! [`ErrorResponses`] so that no route can forget one.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{HeaderBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::domain::{MessageType, SequenceId, UserId};
use crate::error::ErrorCode;
use crate::model::{Message, Profile, Room};
use crate::service::RoomSummary;

/// Where the description is served.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

pub use crate::error::{ErrorBody, ErrorDetail};

// The response bodies below are what the handlers of `routes.rs` return,
// so the description is of the code that answers. Their fields are in
// alphabetical order: the order the wire has always had.

/// `GET /rooms`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomList {
    /// How many rooms there are.
    pub count: usize,
    /// The caller's rooms, newest activity first.
    pub rooms: Vec<RoomSummary>,
}

/// `GET /rooms/{roomId}/messages`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct History {
    /// How many messages the page holds.
    pub count: usize,
    /// Whether more of the requested range exists beyond the page.
    pub has_more: bool,
    /// The page, in ascending `sequenceId`.
    pub messages: Vec<Message>,
    /// The caller's unread count in the room.
    pub unread_count: i64,
}

/// The path parameter of every `/rooms/{roomId}/...` route.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Path, rename_all = "camelCase")]
#[allow(dead_code)] // only describes the path; `RoomPath` reads it
pub struct RoomIdPath {
    /// A room id (1-128 characters)
    #[param(min_length = 1, max_length = 128)]
    room_id: String,
}

/// Query parameters of `GET /rooms/{roomId}/messages`.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)] // only describes the query; the handler reads the raw parameters
pub struct HistoryQuery {
    /// Page size, 1–100 (default 100; outside is 400).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// The page ends right before this sequence id (1–15 decimal digits).
    #[param(minimum = 0, maximum = 999_999_999_999_999_i64)]
    before_sequence_id: Option<i64>,
    /// The page starts right after this sequence id (1–15 decimal digits).
    #[param(minimum = 0, maximum = 999_999_999_999_999_i64)]
    after_sequence_id: Option<i64>,
}

/// `GET /rooms/{roomId}/unread`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Unread {
    /// The room.
    pub room_id: String,
    /// Messages above the caller's cursor sent by others.
    pub unread_count: i64,
}

/// `POST /rooms/{roomId}/read`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MarkedRead {
    /// The caller's cursor after the call (never moves backwards, clamped
    /// to the room's last message).
    pub marked_up_to: SequenceId,
    /// The room.
    pub room_id: String,
    /// Always true.
    pub success: bool,
}

/// `GET /rooms/{roomId}/online`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Online {
    /// How many.
    pub count: usize,
    /// Members with a live connection.
    pub online_users: Vec<UserId>,
    /// The room.
    pub room_id: String,
}

/// `POST /direct`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectRoom {
    /// Its last 50 messages, ascending.
    pub messages: Vec<Message>,
    /// The DIRECT room of the two users.
    pub room: Room,
    /// The caller's unread count.
    pub unread_count: i64,
}

/// `DELETE /rooms/{roomId}/cleanup`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cleanup {
    /// Messages deleted now.
    pub deleted: i64,
    /// Messages kept.
    pub kept: i64,
    /// The room.
    pub room_id: String,
}

/// `{message}`: a stored message.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageEnvelope {
    /// The message.
    pub message: Message,
}

/// `{room}`: a room.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomEnvelope {
    /// The room.
    pub room: Room,
}

/// `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// PostgreSQL.
    pub postgres: HealthWord,
    /// Redis.
    pub redis: HealthWord,
    /// `ok`, or `down` when a dependency does not answer.
    pub status: HealthWord,
}

/// A health state.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthWord {
    /// Answers.
    Ok,
    /// Does not answer within 2 s.
    Down,
}

impl HealthWord {
    /// `Ok` when `up`.
    pub fn of(up: bool) -> Self {
        if up { Self::Ok } else { Self::Down }
    }
}

/// `POST /rooms/{roomId}/messages` (the fields of a WebSocket `sendMessage`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendMessageBody {
    /// At most 4,000 characters, not blank, no U+0000; stored as sent. May
    /// be empty or absent only for `image` and `gift` with `metadata`.
    #[schema(max_length = 4000)]
    pub content: Option<String>,
    /// `text` (default), `image`, `gift`, or `system` (admins only).
    #[serde(rename = "type")]
    pub kind: Option<MessageType>,
    /// A JSON object of at most 8 KiB serialized.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// 1–64 characters: an idempotency key.
    #[schema(min_length = 1, max_length = 64)]
    pub client_message_id: Option<String>,
}

/// `POST /rooms/{roomId}/read`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MarkReadBody {
    /// The highest sequence id read: an integer in 0..=2^53-1.
    #[schema(value_type = i64, minimum = 0, maximum = 9_007_199_254_740_991_i64)]
    pub sequence_id: SequenceId,
}

/// `POST /direct`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectBody {
    /// The other user (not the caller); 404 when unknown.
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    pub target_user_id: String,
}

/// The kind of room `POST /rooms` creates.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum NewRoomType {
    /// A named group.
    Group,
    /// One room per `callId`.
    Call,
}

/// `POST /rooms`: `{type: "GROUP", name, memberIds}` or
/// `{type: "CALL", callId, memberIds}`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateRoomBody {
    /// GROUP or CALL.
    #[serde(rename = "type")]
    pub kind: NewRoomType,
    /// GROUP (required) and CALL (optional): 1–200 characters, not blank.
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    /// CALL: 1–128 characters.
    #[schema(min_length = 1, max_length = 128)]
    pub call_id: Option<String>,
    /// Members besides the caller (known users, at most 1,000).
    #[schema(max_items = 1000, inline)]
    pub member_ids: Option<Vec<UserIdText>>,
}

/// `POST /rooms/{roomId}/members`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddMembersBody {
    /// Known users to add (1–1,000).
    #[schema(min_items = 1, max_items = 1000, inline)]
    pub user_ids: Vec<UserIdText>,
}

/// A user id in a request: 1–64 characters of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
pub struct UserIdText(pub String);

/// Adds the bearer scheme and, to every `/api/v1/chat` operation, the error
/// responses of PROTOCOL §4.
pub struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        let errors = [
            (
                400,
                "BAD_REQUEST: malformed JSON, a bad field, path or query",
            ),
            (
                401,
                "UNAUTHORIZED: missing, malformed, expired or wrongly signed token",
            ),
            (403, "FORBIDDEN: not a member, or not an admin"),
            (404, "NOT_FOUND: unknown room, user or route"),
            (409, "CONFLICT: conflicts with stored state"),
            (413, "PAYLOAD_TOO_LARGE: body over 256 KiB"),
            (
                429,
                "RATE_LIMITED: over the caller's request or send rate, or shedding load; retry after `Retry-After` seconds",
            ),
            (500, "INTERNAL: internal error"),
            (
                503,
                "UNAVAILABLE: PostgreSQL or Redis is unavailable; retry after `Retry-After` seconds",
            ),
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/api/v1/chat/") {
                continue;
            }
            let operations: [&mut Option<Operation>; 3] =
                [&mut item.get, &mut item.post, &mut item.delete];
            for operation in operations.into_iter().flatten() {
                for (status, description) in errors {
                    let mut response = ResponseBuilder::new().description(description).content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                                "ErrorBody",
                            ))))
                            .build(),
                    );
                    if matches!(status, 429 | 503) {
                        response = response.header(
                            "Retry-After",
                            HeaderBuilder::new()
                                .schema(utoipa::openapi::schema::Object::with_type(
                                    utoipa::openapi::schema::Type::Integer,
                                ))
                                .description(Some("seconds"))
                                .build(),
                        );
                    }
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| RefOr::T(response.build()));
                }
            }
        }
    }
}

/// The description: every route of PROTOCOL §4.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Chat & presence REST API",
        version = "1",
        description = "PROTOCOL.md §4: history, rooms, reads and presence over REST. \
                       Every call under /api/v1/chat needs `Authorization: Bearer <JWT>`."
    ),
    paths(
        super::health,
        serve,
        super::routes::list_rooms,
        super::routes::create_room,
        super::routes::history,
        super::routes::send_message,
        super::routes::unread,
        super::routes::mark_read,
        super::routes::online,
        super::routes::direct,
        super::routes::cleanup,
        super::routes::add_members,
        super::routes::remove_member,
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, Profile, Message, Room, RoomSummary)),
    modifiers(&ErrorResponses),
    security(("bearer" = [])),
    tags(
        (name = "chat", description = "Rooms, messages, reads and presence"),
        (name = "service", description = "Health and this description"),
    )
)]
pub struct ApiDoc;

static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_owned())
});

/// The description as JSON (built once).
pub fn document() -> &'static str {
    &DOCUMENT
}

/// `GET /api/v1/openapi.json`: this description.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "service",
    security(()),
    responses((status = 200, description = "The OpenAPI description of this API", content_type = "application/json"))
)]
pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}
