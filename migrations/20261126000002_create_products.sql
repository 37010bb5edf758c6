CREATE TABLE products (
    id          uuid        PRIMARY KEY,
    category_id text        NOT NULL,
    -- Byte-wise order: the same list order on every server, whatever its locale.
    name        text        COLLATE "C" NOT NULL,
    description text        NOT NULL DEFAULT '',
    price_cents bigint      NOT NULL CHECK (price_cents >= 0),
    currency    text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    version     bigint      NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Serves ListProducts: a category in (name, id) order, index-only for the id list.
CREATE INDEX products_category_name_id_idx ON products (category_id, name, id);
-- `readthrough warm` loads the most recently modified products.
CREATE INDEX products_updated_at_idx ON products (updated_at DESC);
