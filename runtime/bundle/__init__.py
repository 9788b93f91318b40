"""The bundle on disk: manifest, files and checksums."""
