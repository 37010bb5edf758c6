//! Per-layer filters that are asked about every span and event.
//!
//! A per-layer filter hands its decision to its layer through a thread-local
//! that `Filter::enabled` sets. When every filter says "always" for a
//! callsite, `tracing` caches that and stops calling `enabled` for it, and the
//! layer then reads whatever the last `enabled` call on that thread left: one
//! made for dynamic metadata that nothing followed (sqlx asks whether
//! `sqlx::query` is enabled after each query) can make the layer drop the next
//! span or event (tokio-rs/tracing#2519). Asked every time, a filter leaves
//! nothing stale; a callsite that no filter wants is still skipped for free.

use tracing::{Event, Metadata, level_filters::LevelFilter, span, subscriber::Interest};
use tracing_subscriber::layer::{Context, Filter};

/// `F`, with "always" for a callsite turned into "sometimes" (see above).
pub struct AskEveryTime<F>(pub F);

impl<S, F: Filter<S>> Filter<S> for AskEveryTime<F> {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        self.0.enabled(meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        match self.0.callsite_enabled(meta) {
            interest if interest.is_always() => Interest::sometimes(),
            interest => interest,
        }
    }

    fn event_enabled(&self, event: &Event<'_>, cx: &Context<'_, S>) -> bool {
        self.0.event_enabled(event, cx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx)
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(id, values, ctx)
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_enter(id, ctx)
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_exit(id, ctx)
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::{Level, Subscriber, callsite::Identifier, field::FieldSet, metadata::Kind};
    use tracing_subscriber::{Layer, filter::filter_fn, layer::SubscriberExt, registry::LookupSpan};

    use super::*;

    /// Names the spans it is told of.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<&'static str>>>);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Seen {
        fn on_new_span(&self, attrs: &span::Attributes<'_>, _: &span::Id, _: Context<'_, S>) {
            self.0.lock().unwrap().push(attrs.metadata().name());
        }
    }

    /// Asks the dispatcher whether metadata made at run time is enabled, the
    /// way sqlx asks about `sqlx::query` after a query.
    fn ask_about_other_metadata() {
        struct Callsite;
        impl tracing::Callsite for Callsite {
            fn set_interest(&self, _: Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!()
            }
        }
        static CALLSITE: Callsite = Callsite;
        let fields = FieldSet::new(&[], Identifier(&CALLSITE));
        let meta = Metadata::new(
            "query",
            "sqlx::query",
            Level::DEBUG,
            None,
            None,
            None,
            fields,
            Kind::EVENT,
        );
        tracing::dispatcher::get_default(|dispatch| dispatch.enabled(&meta));
    }

    #[test]
    fn a_span_after_a_dynamic_check_reaches_every_layer_that_wants_it() {
        let (logs, spans) = (Seen::default(), Seen::default());
        let ours = |meta: &Metadata<'_>| meta.target().starts_with("readthrough");
        let subscriber = tracing_subscriber::registry()
            .with(logs.clone().with_filter(AskEveryTime(LevelFilter::INFO)))
            .with(spans.clone().with_filter(AskEveryTime(filter_fn(ours))));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                ask_about_other_metadata();
                let _span = tracing::info_span!("rpc");
            }
        });
        assert_eq!(*spans.0.lock().unwrap(), ["rpc"; 3], "the span layer saw each span");
        assert_eq!(*logs.0.lock().unwrap(), ["rpc"; 3], "the log layer saw each span");
    }
}
