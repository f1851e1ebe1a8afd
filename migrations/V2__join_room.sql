-- Entering a room in one round trip: `joinRoom` (by room id, or by
-- `targetUserId` for a DIRECT room created when missing) and `POST /direct`
-- call this once, where they used to run five to seven statements on up to
-- three pooled connections (shared/src/store.rs, `Conn::enter_room`).
--
-- Rows, each tagged by `kind` (the columns of other kinds are NULL):
--   'no_user'  the DIRECT target is not a known user (nothing else follows);
--   'room'     the room row, the caller's read cursor (NULL: not a member)
--              and their unread count; absent for an unknown room;
--   'member'   for members only: each member with profile and cursor, in
--              join order;
--   'message'  for members only: the page of history, newest first without
--              p_after, oldest first after it; p_limit + 1 rows at most
--              (the extra row says there is more).
-- Column names are those of the service's other queries, so the same row
-- mappers read them.
--
-- A function rather than one statement: the DIRECT room is looked up,
-- inserted, or (when a concurrent caller inserted it first, and
-- `ON CONFLICT DO NOTHING` waited for that caller to commit) looked up again,
-- and each statement of a PL/pgSQL function takes a new snapshot under READ
-- COMMITTED, so the second lookup sees the winner's room. One statement could
-- not: its snapshot is taken before the conflict.
CREATE FUNCTION chat_enter_room(
    p_room_id text,      -- the room, or NULL with p_target_id
    p_user_id text,      -- the caller
    p_target_id text,    -- the DIRECT partner, with p_room_id NULL
    p_new_room_id text,  -- the id a DIRECT room gets if it is created now
    p_after bigint,      -- NULL: the newest page; else the messages after it
    p_limit bigint       -- the page size
)
RETURNS TABLE (
    kind text,
    id text, type text, name text, call_id text, user1_id text, user2_id text,
    last_sequence_id bigint, last_message_at timestamptz, last_message_text text,
    created_at timestamptz, cursor bigint, unread bigint, created boolean,
    room_id text, sender_id text, content text, metadata jsonb, sequence_id bigint,
    client_message_id text, username text, display_name text, avatar text,
    last_read_sequence_id bigint
)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_room text := p_room_id;
    v_cursor bigint;
    v_created boolean := false;
    v_lo text := LEAST(p_user_id, p_target_id);
    v_hi text := GREATEST(p_user_id, p_target_id);
BEGIN
    IF v_room IS NULL THEN
        SELECT r.id INTO v_room FROM rooms r
         WHERE r.type = 'DIRECT'
           AND LEAST(r.user1_id, r.user2_id) = v_lo AND GREATEST(r.user1_id, r.user2_id) = v_hi;
        IF v_room IS NULL THEN
            IF NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p_target_id) THEN
                RETURN QUERY SELECT 'no_user'::text,
                    NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                    NULL::bigint, NULL::timestamptz, NULL::text, NULL::timestamptz, NULL::bigint,
                    NULL::bigint, NULL::boolean, NULL::text, NULL::text, NULL::text, NULL::jsonb,
                    NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bigint;
                RETURN;
            END IF;
            INSERT INTO rooms AS r (id, type, user1_id, user2_id, created_by)
            VALUES (p_new_room_id, 'DIRECT', v_lo, v_hi, p_user_id)
            ON CONFLICT ((LEAST(user1_id, user2_id)), (GREATEST(user1_id, user2_id)))
              WHERE type = 'DIRECT' DO NOTHING
            RETURNING r.id INTO v_room;
            IF v_room IS NOT NULL THEN
                v_created := true;
                INSERT INTO room_members (room_id, user_id) VALUES (v_room, v_lo), (v_room, v_hi);
            ELSE
                -- A concurrent caller created it; it has committed by now.
                SELECT r.id INTO v_room FROM rooms r
                 WHERE r.type = 'DIRECT'
                   AND LEAST(r.user1_id, r.user2_id) = v_lo
                   AND GREATEST(r.user1_id, r.user2_id) = v_hi;
            END IF;
        END IF;
    END IF;

    SELECT m.last_read_sequence_id INTO v_cursor
      FROM room_members m WHERE m.room_id = v_room AND m.user_id = p_user_id;

    RETURN QUERY
    SELECT 'room'::text,
           r.id, r.type, r.name, r.call_id, r.user1_id, r.user2_id,
           r.last_sequence_id, r.last_message_at, r.last_message_text, r.created_at,
           v_cursor,
           CASE WHEN v_cursor IS NULL THEN NULL::bigint ELSE
             (SELECT count(*) FROM messages x
               WHERE x.room_id = r.id AND x.sequence_id > v_cursor AND x.sender_id <> p_user_id)
           END,
           v_created,
           NULL::text, NULL::text, NULL::text, NULL::jsonb, NULL::bigint, NULL::text,
           NULL::text, NULL::text, NULL::text, NULL::bigint
      FROM rooms r WHERE r.id = v_room;
    IF v_cursor IS NULL THEN
        RETURN;
    END IF;

    RETURN QUERY
    SELECT 'member'::text,
           u.id, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
           NULL::bigint, NULL::timestamptz, NULL::text, NULL::timestamptz, NULL::bigint,
           NULL::bigint, NULL::boolean,
           rm.room_id, NULL::text, NULL::text, NULL::jsonb, NULL::bigint, NULL::text,
           u.username, u.display_name, u.avatar, rm.last_read_sequence_id
      FROM room_members rm JOIN users u ON u.id = rm.user_id
     WHERE rm.room_id = v_room
     ORDER BY rm.joined_at, u.id;

    IF p_after IS NULL THEN
        RETURN QUERY
        SELECT 'message'::text,
               m.id, m.type, NULL::text, NULL::text, NULL::text, NULL::text,
               NULL::bigint, NULL::timestamptz, NULL::text, m.created_at, NULL::bigint,
               NULL::bigint, NULL::boolean,
               m.room_id, m.sender_id, m.content, m.metadata, m.sequence_id, m.client_message_id,
               u.username, u.display_name, u.avatar, NULL::bigint
          FROM messages m JOIN users u ON u.id = m.sender_id
         WHERE m.room_id = v_room
         ORDER BY m.sequence_id DESC LIMIT p_limit + 1;
    ELSE
        RETURN QUERY
        SELECT 'message'::text,
               m.id, m.type, NULL::text, NULL::text, NULL::text, NULL::text,
               NULL::bigint, NULL::timestamptz, NULL::text, m.created_at, NULL::bigint,
               NULL::bigint, NULL::boolean,
               m.room_id, m.sender_id, m.content, m.metadata, m.sequence_id, m.client_message_id,
               u.username, u.display_name, u.avatar, NULL::bigint
          FROM messages m JOIN users u ON u.id = m.sender_id
         WHERE m.room_id = v_room AND m.sequence_id > p_after
         ORDER BY m.sequence_id ASC LIMIT p_limit + 1;
    END IF;
END;
$$;
