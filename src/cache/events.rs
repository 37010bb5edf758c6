//! Invalidation events: what every write publishes on `<namespace>:v1:events`
//! and every instance receives (near caches drop what they name).

use serde::{Deserialize, Serialize};

use super::{Cache, redis::Delivery};

/// What the event subscription delivers (see `Cache::receive_events`).
#[derive(Debug)]
pub enum EventFeed {
    /// Subscribed (again): every event from now on arrives.
    Subscribed,
    /// The subscription dropped: events may be missed until `Subscribed`.
    Lost,
    Event(Event),
}

/// An invalidation, as published to every instance on `<namespace>:v1:events`
/// (JSON, so that other services can read it too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// e.g. `user.updated`, `product.price.changed`, `product.moved`.
    pub event: String,
    pub id: uuid::Uuid,
    /// Product categories whose lists changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
}

impl Cache {
    /// Receives every instance's invalidation events, forever, counting them;
    /// also says when the subscription is up and when it dropped.
    pub async fn receive_events(&self, mut on: impl FnMut(EventFeed)) {
        self.redis
            .subscribe(&self.keys.events(), |delivery| match delivery {
                Delivery::Subscribed => on(EventFeed::Subscribed),
                Delivery::Lost => on(EventFeed::Lost),
                Delivery::Message(payload) => match serde_json::from_slice::<Event>(payload) {
                    Ok(event) => {
                        metrics::counter!("readthrough_events_received_total", "event" => event_label(&event.event))
                            .increment(1);
                        on(EventFeed::Event(event));
                    }
                    Err(error) => tracing::warn!(%error, "ignoring a malformed invalidation event"),
                },
            })
            .await;
    }
}

/// The event names the triggers record (see the migrations).
const EVENT_NAMES: &[&str] = &[
    "user.created",
    "user.updated",
    "user.deleted",
    "user.truncated",
    "user.retired",
    "product.created",
    "product.updated",
    "product.price.changed",
    "product.moved",
    "product.deleted",
    "product.truncated",
    "product.retired",
];

/// The `event` label of an event metric: a known name, or `other`, so that
/// whatever else is published on the shared channel cannot add series.
pub(super) fn event_label(name: &str) -> &'static str {
    EVENT_NAMES
        .iter()
        .find(|known| **known == name)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_labels_are_known_names_or_other() {
        assert_eq!(event_label("product.price.changed"), "product.price.changed");
        assert_eq!(event_label("user.truncated"), "user.truncated");
        assert_eq!(event_label("x".repeat(100).as_str()), "other");
    }
}
