-- A write looks up the outbox rows its own transaction recorded (by xact_id)
-- while it still holds its row locks. Without an index that is a scan of the
-- whole outbox, which grows while Redis is unreachable: every write would slow
-- down with it.
CREATE INDEX cache_outbox_xact_id_idx ON cache_outbox (xact_id);

-- TRUNCATE fires no row trigger. A statement trigger records one row that
-- stands for every entity of the table (event `<entity>.truncated`, nil id);
-- the relay then drops every cached key of that entity.
CREATE FUNCTION cache_outbox_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cache_outbox (entity, entity_id, event)
    VALUES (TG_ARGV[0], '00000000-0000-0000-0000-000000000000', TG_ARGV[0] || '.truncated');
    PERFORM pg_notify('cache_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER users_cache_outbox_truncate
    AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION cache_outbox_truncated('user');

CREATE TRIGGER products_cache_outbox_truncate
    AFTER TRUNCATE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION cache_outbox_truncated('product');
