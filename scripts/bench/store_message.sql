-- The pgbench ceiling of scripts/bench.sh: the statement Store::store_message
-- (shared/src/store.rs) runs for every sendMessage, verbatim, with the same
-- parameters: a random DIRECT room of the 1,000 seeded ones, one of its two
-- members as sender, a fresh message id, 64 bytes of text, no metadata, no
-- clientMessageId, retention 100. Keep it in step with store.rs.
\set r random(0, 999)
\set s random(0, 1)
WITH mem AS (
  SELECT 1 FROM room_members WHERE room_id = 'ceil-r' || :r AND user_id = 'ceil-u' || (2 * :r + :s)
), dup AS (
  SELECT m.id, m.content, m.type, m.metadata, m.sequence_id, m.created_at
    FROM messages m
   WHERE m.room_id = 'ceil-r' || :r AND m.sender_id = 'ceil-u' || (2 * :r + :s) AND m.client_message_id = NULL::text
), seq AS (
  UPDATE rooms SET last_sequence_id = last_sequence_id + 1,
         last_message_at = clock_timestamp(), last_message_text = '1732790000000000 1 1 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'
   WHERE id = 'ceil-r' || :r AND EXISTS (SELECT 1 FROM mem) AND NOT EXISTS (SELECT 1 FROM dup)
   RETURNING last_sequence_id, last_message_at
), ins AS (
  INSERT INTO messages (room_id, sequence_id, id, sender_id, content, type,
                        metadata, client_message_id, created_at)
  SELECT 'ceil-r' || :r, seq.last_sequence_id, gen_random_uuid()::text, 'ceil-u' || (2 * :r + :s),
         '1732790000000000 1 1 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx', 'text', NULL::jsonb, NULL::text,
         seq.last_message_at
    FROM seq
  RETURNING sequence_id, created_at
), cursor AS (
  UPDATE room_members SET last_read_sequence_id =
         GREATEST(last_read_sequence_id, seq.last_sequence_id)
    FROM seq WHERE room_id = 'ceil-r' || :r AND user_id = 'ceil-u' || (2 * :r + :s)
), retention AS (
  DELETE FROM messages USING seq
   WHERE messages.room_id = 'ceil-r' || :r AND 100::bigint > 0
     AND messages.sequence_id = seq.last_sequence_id - 100::bigint
)
SELECT EXISTS (SELECT 1 FROM rooms WHERE id = 'ceil-r' || :r) AS room_exists,
       EXISTS (SELECT 1 FROM mem) AS is_member,
       (SELECT sequence_id FROM ins) AS new_sequence_id,
       (SELECT created_at FROM ins) AS new_created_at,
       dup.id AS dup_id, dup.content AS dup_content, dup.type AS dup_type,
       dup.metadata AS dup_metadata, dup.sequence_id AS dup_sequence_id,
       dup.created_at AS dup_created_at,
       u.username, u.display_name, u.avatar
  FROM users u LEFT JOIN dup ON true
 WHERE u.id = 'ceil-u' || (2 * :r + :s);
