-- Run once by the postgres image when its data directory is new
-- (/docker-entrypoint-initdb.d): the two roles of the service.
--
-- `readthrough` owns the database, and so the tables its migrations create;
-- `migrate` connects as it. It is not a superuser and cannot create
-- databases or roles.
CREATE ROLE readthrough LOGIN PASSWORD 'readthrough' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE readthrough OWNER readthrough;
-- `readthrough_service` is what `serve` connects as: `migrate` grants it
-- the rows of the service's tables and nothing more (DATABASE_SERVICE_ROLE).
CREATE ROLE readthrough_service LOGIN PASSWORD 'readthrough_service' NOSUPERUSER NOCREATEDB NOCREATEROLE;
