-- A refresh token's parent presented again within the reuse grace (its
-- answer was lost, or two tabs refreshed at once) gets a new successor in
-- place of the one it had, which is then superseded: never handed out, or
-- handed out to whoever lost the race, so presenting it is reuse and
-- revokes the family. See src/refresh.rs.
ALTER TABLE refresh_tokens ADD COLUMN superseded_at INTEGER;
