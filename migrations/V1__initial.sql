-- Chat & presence schema, v1. Applied by refinery (`chat-local migrate`, or at
-- local start-up); append-only: later changes go in new V<n>__*.sql files.

-- A user becomes known the first time they authenticate; the profile is
-- refreshed from the token claims whenever they change.
CREATE TABLE users (
    id           text PRIMARY KEY,
    username     text NOT NULL,
    display_name text,
    avatar       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rooms (
    id                text PRIMARY KEY,
    type              text NOT NULL CHECK (type IN ('DIRECT', 'GROUP', 'CALL')),
    name              text,
    -- DIRECT rooms only: the two users, stored in sorted order.
    user1_id          text REFERENCES users (id),
    user2_id          text REFERENCES users (id),
    -- CALL rooms only: one room per call.
    call_id           text,
    created_by        text REFERENCES users (id),
    -- The per-room sequence counter: the next message takes last_sequence_id + 1
    -- in the statement that inserts it, under this row's lock.
    last_sequence_id  bigint NOT NULL DEFAULT 0,
    last_message_at   timestamptz,
    last_message_text text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rooms_direct_users CHECK (
        (type = 'DIRECT') = (user1_id IS NOT NULL AND user2_id IS NOT NULL)
        AND (user1_id IS NULL OR user1_id <> user2_id)),
    CONSTRAINT rooms_call_id_present CHECK ((type = 'CALL') = (call_id IS NOT NULL))
);
-- One DIRECT room per unordered pair, whatever order the pair is stored in.
CREATE UNIQUE INDEX rooms_direct_pair_key
    ON rooms (LEAST(user1_id, user2_id), GREATEST(user1_id, user2_id))
    WHERE type = 'DIRECT';
CREATE UNIQUE INDEX rooms_call_id_key ON rooms (call_id) WHERE call_id IS NOT NULL;

CREATE TABLE room_members (
    room_id               text NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id               text NOT NULL REFERENCES users (id),
    -- The read cursor: the highest sequence id this member has read.
    last_read_sequence_id bigint NOT NULL DEFAULT 0,
    joined_at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, user_id)
);
-- "Which rooms is this user in" (GET /rooms, presence fan-out).
CREATE INDEX room_members_user_idx ON room_members (user_id);

CREATE TABLE messages (
    room_id           text NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    sequence_id       bigint NOT NULL,
    id                text NOT NULL UNIQUE,
    sender_id         text NOT NULL REFERENCES users (id),
    content           text NOT NULL,
    type              text NOT NULL CHECK (type IN ('text', 'image', 'gift', 'system')),
    metadata          jsonb,
    client_message_id text,
    created_at        timestamptz NOT NULL,
    -- History pages, gap fills and retention all walk this key.
    PRIMARY KEY (room_id, sequence_id)
);
-- Idempotent sends: one message per (room, sender, clientMessageId).
CREATE UNIQUE INDEX messages_client_message_id_key
    ON messages (room_id, sender_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
