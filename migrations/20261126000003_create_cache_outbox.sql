-- Cache invalidations that must not be lost. Triggers add a row in the same
-- transaction as every change to users or products, whoever makes it (the
-- service or someone with psql), and notify `cache_outbox`. The service's write
-- path deletes its rows once Redis confirmed its invalidation; a relay in every
-- instance handles the rest (deletes the keys, publishes the event, then the row).
CREATE TABLE cache_outbox (
    id          bigserial   PRIMARY KEY,
    -- 'user' or 'product'
    entity      text        NOT NULL,
    entity_id   uuid        NOT NULL,
    -- Product categories whose lists the change affects (old and new).
    categories  text[]      NOT NULL DEFAULT '{}',
    -- user.created, product.price.changed, ...
    event       text        NOT NULL,
    -- Lets the writing transaction find the rows it recorded.
    xact_id     xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION cache_outbox_users() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO cache_outbox (entity, entity_id, event) VALUES ('user', NEW.id, 'user.created');
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO cache_outbox (entity, entity_id, event) VALUES ('user', OLD.id, 'user.deleted');
    ELSE
        INSERT INTO cache_outbox (entity, entity_id, event) VALUES ('user', NEW.id, 'user.updated');
        IF NEW.id <> OLD.id THEN
            INSERT INTO cache_outbox (entity, entity_id, event) VALUES ('user', OLD.id, 'user.deleted');
        END IF;
    END IF;
    PERFORM pg_notify('cache_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER users_cache_outbox
    AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION cache_outbox_users();

CREATE FUNCTION cache_outbox_products() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO cache_outbox (entity, entity_id, categories, event)
        VALUES ('product', NEW.id, ARRAY[NEW.category_id], 'product.created');
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO cache_outbox (entity, entity_id, categories, event)
        VALUES ('product', OLD.id, ARRAY[OLD.category_id], 'product.deleted');
    ELSE
        event := CASE
            WHEN NEW.category_id <> OLD.category_id THEN 'product.moved'
            WHEN NEW.price_cents <> OLD.price_cents OR NEW.currency <> OLD.currency THEN 'product.price.changed'
            ELSE 'product.updated'
        END;
        INSERT INTO cache_outbox (entity, entity_id, categories, event)
        VALUES ('product', NEW.id, ARRAY(SELECT DISTINCT unnest(ARRAY[OLD.category_id, NEW.category_id])), event);
        IF NEW.id <> OLD.id THEN
            INSERT INTO cache_outbox (entity, entity_id, categories, event)
            VALUES ('product', OLD.id, ARRAY[OLD.category_id], 'product.deleted');
        END IF;
    END IF;
    PERFORM pg_notify('cache_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER products_cache_outbox
    AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH ROW EXECUTE FUNCTION cache_outbox_products();
