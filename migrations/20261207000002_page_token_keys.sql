-- The MAC keys of page tokens (see api::page_token), made here so that every
-- instance shares one with nothing to configure. The newest signs; all are
-- accepted, so a new key can be added before the old one is deleted.
CREATE TABLE page_token_keys (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key bytea NOT NULL CHECK (length(key) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- 32 bytes from two random UUIDs: pg_strong_random, 244 random bits.
INSERT INTO page_token_keys (key)
SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');
