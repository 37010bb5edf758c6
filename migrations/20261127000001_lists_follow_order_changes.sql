-- A product's lists change only when its place in them does: when it is
-- created, deleted, renamed (lists are ordered by name) or moved to another
-- category. A change of price, currency or description leaves its category's
-- list as it was, so such an outbox row names no category and the relay
-- invalidates the product's entry alone.
CREATE OR REPLACE FUNCTION cache_outbox_products() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event text;
    categories text[] := '{}';
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
        IF NEW.category_id <> OLD.category_id OR NEW.name <> OLD.name OR NEW.id <> OLD.id THEN
            categories := ARRAY(SELECT DISTINCT unnest(ARRAY[OLD.category_id, NEW.category_id]));
        END IF;
        INSERT INTO cache_outbox (entity, entity_id, categories, event)
        VALUES ('product', NEW.id, categories, event);
        IF NEW.id <> OLD.id THEN
            INSERT INTO cache_outbox (entity, entity_id, categories, event)
            VALUES ('product', OLD.id, ARRAY[OLD.category_id], 'product.deleted');
        END IF;
    END IF;
    PERFORM pg_notify('cache_outbox', '');
    RETURN NULL;
END;
$$;
