package main

import (
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
)

// The DSN's password must never be printed, and the DSN may be malformed:
// parsers repeat a string they cannot parse in their errors, so the DSN is
// redacted by scanning it, before anything parses it.
//
// sim/dsn.go is a copy of this file, for the simulator's database errors
// (it is another package main); TestSimDSNIsACopy keeps the two equal.

const (
	// hiddenValue stands for a password that was removed.
	hiddenValue = "xxxxx"
	// hiddenRest stands for the rest of a key=value DSN that does not scan:
	// where a value ends is unknown there, so all of it may be a password.
	hiddenRest = "..."
)

// redactDSN returns the DSN with its password removed, in either form; it
// never fails, and what it cannot read it leaves out.
func redactDSN(dsn string) string {
	if scheme, rest, ok := strings.Cut(dsn, "://"); ok && isURLScheme(scheme) {
		return scheme + "://" + redactURL(rest)
	}
	return redactKeyValues(dsn)
}

func isURLScheme(s string) bool {
	for i, c := range s {
		letter := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		if !letter && (i == 0 || !(c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.')) {
			return false
		}
	}
	return s != ""
}

// redactURL hides the password of a URL DSN (after "scheme://") without
// parsing it. The user info ends at the last '@', so a password holding an
// unescaped '@', '/' or '?' is hidden whole; a query parameter whose name
// holds "password" (lib/pq takes one) loses its value.
func redactURL(rest string) string {
	if query := strings.IndexByte(rest, '?'); query >= 0 {
		params := strings.Split(rest[query+1:], "&")
		for i, p := range params {
			if k, _, ok := strings.Cut(p, "="); ok && isPasswordKey(unescapeOrRaw(k)) {
				params[i] = k + "=" + hiddenValue
			}
		}
		rest = rest[:query+1] + strings.Join(params, "&")
	}
	if at := strings.LastIndexByte(rest, '@'); at >= 0 {
		if user, _, ok := strings.Cut(rest[:at], ":"); ok {
			rest = user + ":" + hiddenValue + rest[at:]
		}
	}
	return rest
}

func unescapeOrRaw(s string) string {
	if u, err := url.QueryUnescape(s); err == nil {
		return u
	}
	return s
}

// isPasswordKey covers password and sslpassword (the client key's
// passphrase), in any case.
func isPasswordKey(k string) bool {
	return strings.Contains(strings.ToLower(k), "password")
}

// redactKeyValues reads a key=value DSN by libpq's rules (values may be
// 'quoted', with \ escaping the next character) and hides password values.
// At the first thing that does not scan it stops. The rest is shown when it
// cannot hold a password, so that the operator sees the mistake ("localhost"
// where "host=localhost" was meant), and hidden otherwise.
func redactKeyValues(dsn string) string {
	var out []string
	s := dsn
	afterPassword := false
	for {
		s = strings.TrimLeft(s, " \t\n\r\f\v")
		if s == "" {
			return strings.Join(out, " ")
		}
		key, value, rest, ok := nextKeyValue(s)
		if !ok {
			if afterPassword || mayHoldPassword(s) {
				s = hiddenRest
			}
			return strings.Join(append(out, s), " ")
		}
		afterPassword = isPasswordKey(key)
		if afterPassword {
			value = hiddenValue
		}
		out = append(out, key+"="+value)
		s = rest
	}
}

// mayHoldPassword tells whether the unreadable rest of a key=value DSN may
// hold a password: it names one, or it looks like user:password@host with
// the scheme left out. A rest right after a password value is hidden by the
// caller too, since an unquoted space may have split the password.
func mayHoldPassword(rest string) bool {
	return isPasswordKey(rest) || strings.ContainsAny(rest, ":@'\\")
}

// nextKeyValue splits the first key=value off s (which starts with the key)
// and returns the value as written, quotes and escapes included.
func nextKeyValue(s string) (key, value, rest string, ok bool) {
	end := strings.IndexAny(s, "= \t\n\r\f\v")
	if end <= 0 {
		return "", "", "", false
	}
	key, s = s[:end], strings.TrimLeft(s[end:], " \t\n\r\f\v")
	if !strings.HasPrefix(s, "=") {
		return "", "", "", false
	}
	s = strings.TrimLeft(s[1:], " \t\n\r\f\v")
	quoted := strings.HasPrefix(s, "'")
	i := 0
	if quoted {
		i = 1
	}
	for ; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\':
			i++ // the next character is part of the value
		case quoted && c == '\'':
			return key, s[:i+1], s[i+1:], true
		case !quoted && strings.IndexByte(" \t\n\r\f\v", c) >= 0:
			return key, s[:i], s[i:], true
		}
	}
	if quoted || i > len(s) { // an unterminated quote or a trailing backslash
		return "", "", "", false
	}
	return key, s, "", true
}

// goQuoted matches a double-quoted Go string in an error message.
var goQuoted = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)

// dsnError reports a DSN the driver rejected. The driver's message quotes
// what it could not parse, which may be the whole DSN or a piece of the
// password, so it is not wrapped: a quoted piece is kept only when it is
// part of the redacted DSN, which is already safe to print.
func dsnError(dsn string, err error) error {
	safe := redactDSN(dsn)
	msg := goQuoted.ReplaceAllStringFunc(err.Error(), func(q string) string {
		if s, uerr := strconv.Unquote(q); uerr == nil && (strings.Contains(safe, s) || isSyntax(s)) {
			return q
		}
		return `"` + hiddenRest + `"`
	})
	return fmt.Errorf("-dsn %s: %s", safe, msg)
}

// isSyntax tells whether a quoted piece of the driver's message is the
// punctuation it expected (missing "=" after ...): the hint the operator
// needs, and no secret.
func isSyntax(s string) bool { return s == "=" }
