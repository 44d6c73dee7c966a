-- Failed sign-ins per e-mail address (known or not: the same for both, so
-- the throttle tells nobody whether an account exists). See src/throttle.rs.
CREATE TABLE login_attempts (
    email         TEXT PRIMARY KEY,            -- normalised, as users.email
    failures      INTEGER NOT NULL,            -- attempts since the last success
    last_at       INTEGER NOT NULL,            -- unix seconds of the latest attempt
    blocked_until INTEGER NOT NULL             -- no attempt is checked before this
);

CREATE INDEX login_attempts_by_last ON login_attempts (last_at);
