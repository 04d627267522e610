"""Read models materialised from the stored stream, each exactly once per event (SPEC 5)."""
