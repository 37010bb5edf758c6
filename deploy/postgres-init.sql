-- Run once by the postgres image when its data directory is new
-- (/docker-entrypoint-initdb.d): the role the service connects as. It owns
-- its database, and so the tables its migrations create, but it is not a
-- superuser and cannot create databases or roles.
CREATE ROLE readthrough LOGIN PASSWORD 'readthrough' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE readthrough OWNER readthrough;
