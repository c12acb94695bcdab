package main

import (
	"database/sql"

	"github.com/lib/pq"
)

// openDB opens the database at dsn. The DSN is parsed here, once, so that
// a DSN the driver rejects is reported with its password hidden (dsnError):
// sql.Open would defer the parse to the first query, whose error repeats
// what the driver could not parse, password included.
func openDB(dsn string) (*sql.DB, error) {
	connector, err := pq.NewConnector(dsn)
	if err != nil {
		return nil, dsnError(dsn, err)
	}
	return sql.OpenDB(connector), nil
}
