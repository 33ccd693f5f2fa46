"""Demo schemas and data for the sandbox clusters of `make run` (and for tests that want a
database that looks like a service's). Small, but with the things real schemas have:
sequences, foreign keys, a view, comments, grants to application roles."""

AUTH_SQL = """
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    username text NOT NULL UNIQUE,
    email text NOT NULL,
    password_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    is_active boolean NOT NULL DEFAULT true
);
CREATE TABLE sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id bigint NOT NULL REFERENCES users(id),
    started_at timestamptz NOT NULL DEFAULT now(),
    ip inet
);
CREATE TABLE login_events (
    id bigserial PRIMARY KEY,
    user_id bigint REFERENCES users(id),
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    success boolean NOT NULL
);
COMMENT ON TABLE users IS 'Customers and staff who can sign in to the bank portal';
INSERT INTO users (username, email, password_hash)
    SELECT 'user' || g, 'user' || g || '@example.test', md5(g::text)
    FROM generate_series(1, 500) g;
INSERT INTO sessions (user_id, ip) SELECT 1 + g % 500, '10.0.0.1'::inet + g FROM generate_series(1, 800) g;
INSERT INTO login_events (user_id, success) SELECT 1 + g % 500, g % 7 <> 0 FROM generate_series(1, 3000) g;
CREATE VIEW active_users AS SELECT id, username FROM users WHERE is_active;
"""

ACCOUNT_SQL = """
CREATE TABLE customers (
    id bigserial PRIMARY KEY,
    auth_user_id bigint NOT NULL,
    name text NOT NULL
);
CREATE TABLE accounts (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers(id),
    iban text NOT NULL UNIQUE,
    currency char(3) NOT NULL DEFAULT 'EUR',
    balance numeric(18,2) NOT NULL DEFAULT 0
);
CREATE TABLE transactions (
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts(id),
    amount numeric(18,2) NOT NULL,
    booked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    reference text
);
CREATE INDEX ON transactions (account_id, booked_at);
COMMENT ON TABLE transactions IS 'Booked movements; the balance is their sum';
INSERT INTO customers (auth_user_id, name) SELECT g, 'Customer ' || g FROM generate_series(1, 400) g;
INSERT INTO accounts (customer_id, iban, balance)
    SELECT 1 + (g - 1) % 400, 'DE' || lpad(g::text, 20, '0'), 0 FROM generate_series(1, 600) g;
INSERT INTO transactions (account_id, amount, reference)
    SELECT 1 + g % 600, round((random() * 2000 - 1000)::numeric, 2), 'ref-' || md5(g::text)
    FROM generate_series(1, 20000) g;
UPDATE accounts a SET balance = t.s FROM (SELECT account_id, sum(amount) s FROM transactions GROUP BY 1) t
    WHERE t.account_id = a.id;
CREATE VIEW account_balances AS SELECT iban, balance FROM accounts;
"""

SERVICES = {
    "auth": {"port": 5433, "dbname": "authdb", "sql": AUTH_SQL},
    "account": {"port": 5434, "dbname": "accountdb", "sql": ACCOUNT_SQL},
}
