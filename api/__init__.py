"""The HTTP edge of clerk-audit: webhook intake and the read API."""
