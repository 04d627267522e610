"""The domain: what a recorded Clerk delivery is, and how users and organizations fold from them.

Nothing in this package does I/O.
"""
