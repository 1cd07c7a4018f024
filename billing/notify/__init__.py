"""Gateway webhooks: signed notices of key-state and balance changes (DESIGN 6.4).

``models`` holds the tables and event types; ``endpoints`` registers the receivers and derives
their secrets; ``outbox`` queues an event in the transaction of the change it announces;
``delivery`` sends the queued events, retries them and replays them.
"""
