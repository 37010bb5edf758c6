-- A write whose invalidation neither its writer nor any relay could confirm
-- in time is fenced: its writer sets `fenced_at` on its outbox rows, and
-- while any fenced row of a kind stands no instance trusts what Redis holds
-- of that kind. Every instance looks for them every 200 ms, through the
-- partial index, which holds only fenced rows: none, normally.
ALTER TABLE cache_outbox ADD COLUMN fenced_at timestamptz;
CREATE INDEX cache_outbox_fenced_idx ON cache_outbox (entity) WHERE fenced_at IS NOT NULL;

-- The relay asks, per kind, for the oldest pending row and how many are
-- pending (up to a bound), to tell a backlog it should retire with a key
-- epoch bump from one it deletes key by key.
CREATE INDEX cache_outbox_entity_id_idx ON cache_outbox (entity, id);

-- The highest key epoch of each kind any instance has seen, per cache
-- namespace. Redis holds the epochs; this copy outlives a Redis restarted
-- empty, so that an instance starting before the others have bumped the
-- epochs above their old values starts above them too, not at 0.
CREATE TABLE cache_key_epochs (
    namespace text   NOT NULL,
    kind      text   NOT NULL,
    epoch     bigint NOT NULL,
    PRIMARY KEY (namespace, kind)
);
