-- Users, their refresh-token families, and the keys that sign access tokens.
-- Times the service computes with are INTEGER unix seconds; created_at shown
-- to clients is RFC 3339 text.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,            -- UUID v4, the JWT `sub`
    email         TEXT NOT NULL,               -- normalised: trimmed, lower case
    name          TEXT,
    password_hash TEXT NOT NULL,               -- argon2id PHC string
    created_at    TEXT NOT NULL                -- RFC 3339 UTC
);

-- Emails are stored lower-cased; NOCASE also catches any row written
-- before normalisation changes.
CREATE UNIQUE INDEX users_by_email ON users (email COLLATE NOCASE);

-- One family per login: every refresh token descends from that login's
-- first one. Reusing a spent token revokes the whole family.
CREATE TABLE refresh_families (
    id             TEXT PRIMARY KEY,           -- UUID v4
    user_id        TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at     INTEGER NOT NULL,
    revoked_at     INTEGER,
    revoked_reason TEXT                        -- 'logout' | 'reuse'
);

CREATE INDEX refresh_families_by_user ON refresh_families (user_id);

-- Only the SHA-256 of a token is stored: a copy of this table does not let
-- anyone refresh.
CREATE TABLE refresh_tokens (
    token_hash  BLOB PRIMARY KEY,              -- SHA-256 of the opaque token
    family_id   TEXT NOT NULL REFERENCES refresh_families (id) ON DELETE CASCADE,
    parent_hash BLOB,                          -- the token it replaced
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER                        -- set when rotated
);

CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens (expires_at);

-- Ed25519 signing keys. `generation` is UNIQUE so that two replicas racing
-- to rotate cannot both add "the next" key; see src/keys.rs.
CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,             -- RFC 7638 thumbprint
    generation   INTEGER NOT NULL UNIQUE,
    pkcs8        BLOB NOT NULL,                -- the private key, PKCS#8 v2
    public_key   BLOB NOT NULL,                -- 32 bytes
    created_at   INTEGER NOT NULL,             -- published in the JWKS from here
    activates_at INTEGER NOT NULL              -- signs from here
);
