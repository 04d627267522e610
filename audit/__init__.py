"""clerk-audit: an event-sourced audit log for Clerk webhooks."""
