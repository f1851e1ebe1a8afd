//! Sending a message: `sendMessage` on a WebSocket and
//! `POST /rooms/{roomId}/messages`.

use crate::auth::AuthUser;
use crate::bus::{Target, event_json};
use crate::domain::{NewMessage, RoomId};
use crate::error::Result;
use crate::store::Stored;

use super::Chat;

impl Chat {
    /// Stores a message and broadcasts it to the room's joined connections.
    /// A repeated `clientMessageId` stores and broadcasts nothing and
    /// returns the original.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    pub async fn send_message(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
        message: &NewMessage,
    ) -> Result<Stored> {
        self.send_message_from(user, room_id, message, None).await
    }

    /// Like [`Chat::send_message`], from a WebSocket connection: the
    /// `message` event also goes to `connection_id` whether it joined the
    /// room or not (it is the sender's acknowledgement). A repeated
    /// `clientMessageId` sends the original to that connection alone.
    ///
    /// # Errors
    /// `NOT_FOUND` / `FORBIDDEN`, or a dependency failure.
    #[tracing::instrument(skip_all, fields(
        request_kind = "sendMessage", connection_id = connection_id,
        user_id = %user.id, room_id = %room_id))]
    pub async fn send_message_from(
        &self,
        user: &AuthUser,
        room_id: &RoomId,
        message: &NewMessage,
        connection_id: Option<&str>,
    ) -> Result<Stored> {
        match self.store.store_message(room_id, &user.id, message).await? {
            Stored::New(msg) => {
                let event = event_json("message", &msg)?;
                let include = connection_id.map(str::to_owned).into_iter().collect();
                let envelope = self.bus.message_event(
                    room_id.as_str(),
                    msg.sequence_id.get(),
                    event,
                    include,
                )?;
                self.bus.publish_room_message(&envelope).await?;
                Ok(Stored::New(msg))
            }
            Stored::Duplicate(msg) => {
                let members = self
                    .store
                    .conn()
                    .await?
                    .room_members(room_id.as_str())
                    .await?;
                let original = msg.with_read_by(&members);
                if let Some(connection_id) = connection_id {
                    // Only the sender sees the original again.
                    self.bus
                        .publish(
                            Target::Connection {
                                connection_id: connection_id.to_owned(),
                            },
                            event_json("message", &original)?,
                        )
                        .await?;
                }
                Ok(Stored::Duplicate(original))
            }
        }
    }
}
