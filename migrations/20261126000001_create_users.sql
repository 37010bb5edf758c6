CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    email         text        NOT NULL,
    preferences   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version       bigint      NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_modified timestamptz NOT NULL DEFAULT now()
);

-- Emails are unique regardless of case; lookups by email use the same expression.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
-- `readthrough warm` loads the most recently modified users.
CREATE INDEX users_last_modified_idx ON users (last_modified DESC);
