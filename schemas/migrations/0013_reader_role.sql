-- Postgres roles per service: the projector owns and writes the read models (it runs the migrations and the
-- rebuild swaps, which need ownership); everything that only reads them (the API, dashboards, operators'
-- ad hoc queries) connects as a member of cocoon_reader, which can SELECT and nothing else.
--
-- Roles are cluster-wide: created once, by whichever database migrates first (two creating it at once is
-- not an error). Grants are per schema: this one (the live schema, or a rebuild's shadow schema, whose
-- grants move with it when it is swapped in), and by default every table and view the migrating role
-- creates later, in any schema.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cocoon_reader') THEN
        CREATE ROLE cocoon_reader NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO cocoon_reader', current_schema());
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO cocoon_reader', current_schema());
END
$$;

ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO cocoon_reader;
