"""The web console at /console: decisions, tenants, policy versions and a playground, server-rendered HTML.

keys.py says who a console key belongs to, session.py signs the session cookie and its CSRF token, filters.py
reads the decisions page's filters, diff.py lines two policy texts up, playground.py screens a text with the
proxy's own engine (never its verdict cache), limits.py bounds failed sign-ins and trials in flight, pages.py
renders the templates, and routes.py is the HTTP surface (off unless `console.enabled`)."""
