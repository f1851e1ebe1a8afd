//! `typing`, coalesced per user and room.

use serde_json::json;

use crate::auth::AuthUser;
use crate::bus::{Target, event_json};
use crate::domain::RoomId;
use crate::error::Result;

use super::Chat;

impl Chat {
    /// Tells the room's other users that `user` started or stopped typing.
    /// A repeat of the state that went out less than 2 s ago is dropped; a
    /// change always goes out. Returns whether it went out.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    #[tracing::instrument(skip_all, fields(
        request_kind = "typing", user_id = %user.id, room_id = %room_id))]
    pub async fn typing(&self, user: &AuthUser, room_id: &RoomId, is_typing: bool) -> Result<bool> {
        self.require_member(user, room_id).await?;
        let event = event_json(
            "typing",
            &json!({"roomId": room_id, "userId": user.id, "username": user.username, "isTyping": is_typing}),
        )?;
        let envelope = self.bus.envelope(
            Target::Room {
                room_id: room_id.to_string(),
            },
            event,
            Vec::new(),
            vec![user.id.to_string()],
            None,
        )?;
        self.limiter
            .publish_typing(room_id, &user.id, is_typing, self.bus.channel(), &envelope)
            .await
    }
}
