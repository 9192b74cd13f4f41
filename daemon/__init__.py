"""cryid.daemon: sources, identification, MQTT publishing, outbox, config and the `cryid` command."""
