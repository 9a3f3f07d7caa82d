-- 004: which tenant owns which schema. `tenants hash --register` records it; the unique schema name
-- makes two tenants on one schema impossible even when two provisioning runs race.
CREATE TABLE public.outbox_tenants (
    tenant_id   bigint      PRIMARY KEY CHECK (tenant_id > 0),
    schema_name varchar(63) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT outbox_tenants_schema_name UNIQUE (schema_name)
);
