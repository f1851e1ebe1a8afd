//! The `/api/v1/chat` routes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::Value;

use crate::domain::{
    MAX_CALL_ID_CHARS, NewMessage, SequenceId, UserId, parse_query_int, parse_room_name,
    parse_user_ids,
};
use crate::error::{Error, Result};
use crate::service::{NewRoom, SNAPSHOT_MESSAGES};
use crate::store::{PageQuery, RoomKey, Stored};

use super::AppState;
use super::extract::{Caller, JsonObject, Params, RoomPath, RoomUserPath, SendingCaller};
use super::openapi::{
    Cleanup, DirectRoom, History, MarkedRead, MessageEnvelope, Online, RoomEnvelope, RoomList,
    Unread,
};

/// The routes, with load shedding in front of them.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/rooms", get(list_rooms).post(create_room))
        .route("/rooms/{roomId}/messages", get(history).post(send_message))
        .route("/rooms/{roomId}/unread", get(unread))
        .route("/rooms/{roomId}/read", post(mark_read))
        .route("/rooms/{roomId}/online", get(online))
        .route("/rooms/{roomId}/cleanup", delete(cleanup))
        .route("/rooms/{roomId}/members", post(add_members))
        .route("/rooms/{roomId}/members/{userId}", delete(remove_member))
        .route("/direct", post(direct))
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            super::shed_load,
        ))
}

/// The caller's rooms, newest activity first.
#[utoipa::path(get, path = "/api/v1/chat/rooms", tag = "chat",
    responses((status = 200, description = "The caller's rooms", body = super::openapi::RoomList)))]
pub(super) async fn list_rooms(
    State(state): State<AppState>,
    Caller(user): Caller,
) -> Result<Json<RoomList>> {
    let rooms = state.chat.list_rooms(&user).await?;
    Ok(Json(RoomList {
        count: rooms.len(),
        rooms,
    }))
}

/// A page of a room's history, ascending `sequenceId`.
#[utoipa::path(get, path = "/api/v1/chat/rooms/{roomId}/messages", tag = "chat",
    params(super::openapi::RoomIdPath, super::openapi::HistoryQuery),
    responses((status = 200, description = "A page of messages", body = super::openapi::History)))]
pub(super) async fn history(
    State(state): State<AppState>,
    Caller(user): Caller,
    RoomPath(room_id): RoomPath,
    Params(params): Params,
) -> Result<Json<History>> {
    let limit = match params.get("limit") {
        Some(raw) => parse_query_int(raw, "limit", 1, 100)?,
        None => 100,
    };
    let before = params
        .get("beforeSequenceId")
        .map(|raw| SequenceId::from_query(raw, "beforeSequenceId"))
        .transpose()?;
    let after = params
        .get("afterSequenceId")
        .map(|raw| SequenceId::from_query(raw, "afterSequenceId"))
        .transpose()?;
    let snap = state
        .chat
        .snapshot(
            &user,
            &room_id,
            PageQuery {
                before,
                after,
                limit,
            },
        )
        .await?;
    Ok(Json(History {
        count: snap.messages.len(),
        has_more: snap.has_more,
        messages: snap.messages,
        unread_count: snap.unread_count,
    }))
}

/// Stores a message and broadcasts it like a WebSocket `sendMessage`.
#[utoipa::path(post, path = "/api/v1/chat/rooms/{roomId}/messages", tag = "chat",
    params(super::openapi::RoomIdPath),
    request_body = super::openapi::SendMessageBody,
    responses(
        (status = 201, description = "Stored", body = super::openapi::MessageEnvelope),
        (status = 200, description = "An idempotent repeat: the original message", body = super::openapi::MessageEnvelope)))]
pub(super) async fn send_message(
    State(state): State<AppState>,
    SendingCaller(user): SendingCaller,
    RoomPath(room_id): RoomPath,
    JsonObject(body): JsonObject,
) -> Result<Response> {
    let message = NewMessage::parse(&body, user.is_admin)?;
    Ok(
        match state.chat.send_message(&user, &room_id, &message).await? {
            Stored::New(message) => {
                (StatusCode::CREATED, Json(MessageEnvelope { message })).into_response()
            }
            Stored::Duplicate(message) => {
                (StatusCode::OK, Json(MessageEnvelope { message })).into_response()
            }
        },
    )
}

/// The caller's unread count in a room.
#[utoipa::path(get, path = "/api/v1/chat/rooms/{roomId}/unread", tag = "chat",
    params(super::openapi::RoomIdPath),
    responses((status = 200, description = "Unread count", body = super::openapi::Unread)))]
pub(super) async fn unread(
    State(state): State<AppState>,
    Caller(user): Caller,
    RoomPath(room_id): RoomPath,
) -> Result<Json<Unread>> {
    let unread_count = state.chat.unread_count(&user, &room_id).await?;
    Ok(Json(Unread {
        room_id: room_id.to_string(),
        unread_count,
    }))
}

/// Moves the caller's read cursor.
#[utoipa::path(post, path = "/api/v1/chat/rooms/{roomId}/read", tag = "chat",
    params(super::openapi::RoomIdPath),
    request_body = super::openapi::MarkReadBody,
    responses((status = 200, description = "The cursor after the call", body = super::openapi::MarkedRead)))]
pub(super) async fn mark_read(
    State(state): State<AppState>,
    Caller(user): Caller,
    RoomPath(room_id): RoomPath,
    JsonObject(body): JsonObject,
) -> Result<Json<MarkedRead>> {
    let sequence_id = match body.get("sequenceId") {
        Some(v) => SequenceId::from_json(v, "sequenceId")?,
        None => return Err(Error::bad_request("sequenceId is required")),
    };
    let cursor = state.chat.mark_read(&user, &room_id, sequence_id).await?;
    Ok(Json(MarkedRead {
        marked_up_to: cursor,
        room_id: room_id.to_string(),
        success: true,
    }))
}

/// The room's members with a live connection.
#[utoipa::path(get, path = "/api/v1/chat/rooms/{roomId}/online", tag = "chat",
    params(super::openapi::RoomIdPath),
    responses((status = 200, description = "Online members", body = super::openapi::Online)))]
pub(super) async fn online(
    State(state): State<AppState>,
    Caller(user): Caller,
    RoomPath(room_id): RoomPath,
) -> Result<Json<Online>> {
    let online_users = state.chat.online_in_room(&user, &room_id).await?;
    Ok(Json(Online {
        count: online_users.len(),
        online_users,
        room_id: room_id.to_string(),
    }))
}

/// The DIRECT room with another user, created if needed.
#[utoipa::path(post, path = "/api/v1/chat/direct", tag = "chat",
    request_body = super::openapi::DirectBody,
    responses((status = 200, description = "The room and its last 50 messages", body = super::openapi::DirectRoom)))]
pub(super) async fn direct(
    State(state): State<AppState>,
    Caller(user): Caller,
    JsonObject(body): JsonObject,
) -> Result<Json<DirectRoom>> {
    let target = match body.get("targetUserId") {
        Some(Value::String(s)) => UserId::parse(s, "targetUserId")?,
        _ => return Err(Error::bad_request("targetUserId must be a user id")),
    };
    let snap = state
        .chat
        .enter_room(&user, RoomKey::DirectWith(&target), None, SNAPSHOT_MESSAGES)
        .await?;
    Ok(Json(DirectRoom {
        room: snap.room_view(),
        messages: snap.messages,
        unread_count: snap.unread_count,
    }))
}

/// Admin only: applies the retention rule to a room now.
#[utoipa::path(delete, path = "/api/v1/chat/rooms/{roomId}/cleanup", tag = "chat",
    params(super::openapi::RoomIdPath),
    responses((status = 200, description = "What was deleted and kept", body = super::openapi::Cleanup)))]
pub(super) async fn cleanup(
    State(state): State<AppState>,
    Caller(user): Caller,
    RoomPath(room_id): RoomPath,
) -> Result<Json<Cleanup>> {
    let (deleted, kept) = state.chat.cleanup(&user, &room_id).await?;
    Ok(Json(Cleanup {
        deleted,
        kept,
        room_id: room_id.to_string(),
    }))
}

/// Creates a GROUP room, or a CALL room (one per `callId`).
#[utoipa::path(post, path = "/api/v1/chat/rooms", tag = "chat",
    request_body = super::openapi::CreateRoomBody,
    responses(
        (status = 201, description = "Created; the caller is a member", body = super::openapi::RoomEnvelope),
        (status = 200, description = "A CALL with an existing callId: that room", body = super::openapi::RoomEnvelope)))]
pub(super) async fn create_room(
    State(state): State<AppState>,
    Caller(user): Caller,
    JsonObject(body): JsonObject,
) -> Result<Response> {
    let member_ids = match body.get("memberIds") {
        None | Some(Value::Null) => Vec::new(),
        some => parse_user_ids(some, "memberIds")?,
    };
    let request = match body.get("type").and_then(Value::as_str) {
        Some("GROUP") => NewRoom::Group {
            name: parse_room_name(body.get("name"))?,
            member_ids,
        },
        Some("CALL") => {
            let call_id = match body.get("callId") {
                Some(Value::String(s))
                    if !s.is_empty()
                        && s.chars().count() <= MAX_CALL_ID_CHARS
                        && !s.contains('\0') =>
                {
                    s.clone()
                }
                _ => {
                    return Err(Error::bad_request(
                        "callId must be a string of 1-128 characters",
                    ));
                }
            };
            let name = match body.get("name") {
                None | Some(Value::Null) => None,
                some => Some(parse_room_name(some)?),
            };
            NewRoom::Call {
                call_id,
                name,
                member_ids,
            }
        }
        _ => return Err(Error::bad_request("type must be GROUP or CALL")),
    };
    let (room, created) = state.chat.create_room(&user, request).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(RoomEnvelope { room })).into_response())
}

/// Adds members to a GROUP or CALL room (any member may).
#[utoipa::path(post, path = "/api/v1/chat/rooms/{roomId}/members", tag = "chat",
    params(super::openapi::RoomIdPath),
    request_body = super::openapi::AddMembersBody,
    responses((status = 200, description = "The room", body = super::openapi::RoomEnvelope)))]
pub(super) async fn add_members(
    State(state): State<AppState>,
    Caller(user): Caller,
    RoomPath(room_id): RoomPath,
    JsonObject(body): JsonObject,
) -> Result<Json<RoomEnvelope>> {
    let user_ids = parse_user_ids(body.get("userIds"), "userIds")?;
    let room = state.chat.add_members(&user, &room_id, &user_ids).await?;
    Ok(Json(RoomEnvelope { room }))
}

/// Removes a member (yourself, or anyone as an admin).
#[utoipa::path(delete, path = "/api/v1/chat/rooms/{roomId}/members/{userId}", tag = "chat",
    params(super::openapi::RoomIdPath,
        ("userId" = String, Path, description = "The member to remove", pattern = "^[A-Za-z0-9_.:-]{1,64}$")),
    responses((status = 204, description = "Removed")))]
pub(super) async fn remove_member(
    State(state): State<AppState>,
    Caller(user): Caller,
    RoomUserPath(room_id, target): RoomUserPath,
) -> Result<StatusCode> {
    state.chat.remove_member(&user, &room_id, &target).await?;
    Ok(StatusCode::NO_CONTENT)
}
