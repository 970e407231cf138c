"""Durable delivery: the SQLite outbox (input journal + results) and the publisher that drains it over a
Transport until the coordinator's end-to-end ack deletes each row."""
