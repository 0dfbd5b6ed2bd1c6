//! Which of an account's chains an event runs.
//!
//! Chains are indexed by (conversation type, event type), wildcards included, so
//! a lookup costs four hashes and four binary searches over the account's
//! chains whatever the number of accounts. The index is the chains' positions
//! sorted by a hash of what they match: 16 bytes a chain, where a map of maps
//! of strings cost a hundred or more (10,000 accounts keep 100,000 chains in
//! memory).

use std::hash::{DefaultHasher, Hash, Hasher};

use switchboard_sdk::{AccountKey, VumiApiEvent};

use crate::model::{ChainFile, ChainSpec, DEFAULT_CHAIN, Pattern};

const ANY: &str = "*";

/// One version of an account's chains, indexed for matching.
#[derive(Debug)]
pub struct AccountChains {
    account: AccountKey,
    version: u64,
    chains: Vec<ChainSpec>,
    /// Every chain but `default`: the hash of its conversation type and
    /// event type (`*` for any; [`match_hash`]) and its position, sorted.
    index: Box<[(u64, u32)]>,
    default: Option<usize>,
    /// The event types that can reach a paused run ([`AccountChains::awaits`]).
    awaited: Box<[String]>,
}

/// The handler whose steps wait for an event (its `event_type` option).
pub const WAIT_FOR_EVENT: &str = "wait_for_event";

/// The event types `chains` await: each chain's `cancel_on` and each
/// `wait_for_event` step's; sorted, each once.
pub fn awaited_types(chains: &[ChainSpec]) -> Vec<String> {
    let mut awaited: Vec<String> = chains
        .iter()
        .filter_map(|c| c.cancel_on().map(|m| m.event_type.to_string()))
        .chain(chains.iter().flat_map(|c| {
            c.steps
                .iter()
                .filter(|s| s.handler == WAIT_FOR_EVENT)
                .filter_map(|s| {
                    s.config
                        .to_map()
                        .get("event_type")?
                        .as_str()
                        .map(String::from)
                })
        }))
        .collect();
    awaited.sort();
    awaited.dedup();
    awaited
}

/// What an event runs.
#[derive(Debug, PartialEq)]
pub enum Routing<'a> {
    /// These chains matched, in file order.
    Matched(Vec<&'a ChainSpec>),
    /// Nothing matched; the account's `default` chain runs.
    Default(&'a ChainSpec),
    /// Nothing matched and there is no default chain.
    Unrouted,
}

impl<'a> Routing<'a> {
    /// The chains to run, in order.
    pub fn chains(&self) -> Vec<&'a ChainSpec> {
        match self {
            Routing::Matched(c) => c.clone(),
            Routing::Default(c) => vec![*c],
            Routing::Unrouted => Vec::new(),
        }
    }
}

fn pattern_key<K: AsRef<str>>(p: &Pattern<K>) -> &str {
    match p {
        Pattern::Any => ANY,
        Pattern::Exact(k) => k.as_ref(),
    }
}

impl AccountChains {
    /// Indexes `version` of an account's chains.
    pub fn new(version: u64, file: ChainFile) -> Self {
        let default = file.chains.iter().position(|c| c.name == DEFAULT_CHAIN);
        let mut index: Vec<(u64, u32)> = (0..file.chains.len())
            .filter(|&i| Some(i) != default)
            .map(|i| {
                let position =
                    u32::try_from(i).expect("an account's chains number fewer than 2^32");
                let (ct, et) = index_key(&file.chains, position);
                (match_hash(ct, et), position)
            })
            .collect();
        index.sort_unstable();
        let awaited = awaited_types(&file.chains);
        Self {
            account: file.account_key,
            version,
            chains: file.chains,
            index: index.into(),
            default,
            awaited: awaited.into(),
        }
    }

    /// These chains, whose runs paused under earlier versions may also
    /// await events of `types` (what those versions' chains awaited).
    pub fn awaiting_also(mut self, types: &[String]) -> Self {
        if !types.is_empty() {
            let mut awaited = std::mem::take(&mut self.awaited).into_vec();
            awaited.extend(types.iter().cloned());
            awaited.sort();
            awaited.dedup();
            self.awaited = awaited.into();
        }
        self
    }

    /// Whether an event of `event_type` can reach a paused run of these
    /// chains: a chain's `cancel_on` names it, or a `wait_for_event` step
    /// waits for it (in this version, or in an earlier one whose runs may
    /// still be paused). Only then does the dispatcher look for paused runs.
    pub fn awaits(&self, event_type: &str) -> bool {
        self.awaited.iter().any(|t| t == event_type)
    }

    /// The account.
    pub fn account(&self) -> &AccountKey {
        &self.account
    }

    /// The version number of these chains.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every chain, in file order.
    pub fn chains(&self) -> &[ChainSpec] {
        &self.chains
    }

    /// The chains `event` runs, not counting `when` conditions. Every chain
    /// whose match holds runs, in file order; when none does, the chain named
    /// `default` runs (if its own match holds); otherwise the event is
    /// unrouted. With conditions, use [`Self::candidates`] and
    /// [`Self::default_for`]: the default runs only when no candidate's
    /// condition holds.
    pub fn route(&self, event: &VumiApiEvent) -> Routing<'_> {
        let hits = self.candidates(event);
        if !hits.is_empty() {
            return Routing::Matched(hits);
        }
        match self.default_for(event) {
            Some(chain) => Routing::Default(chain),
            None => Routing::Unrouted,
        }
    }

    /// Whether any chain has a `when` condition.
    pub fn has_conditions(&self) -> bool {
        self.chains.iter().any(|c| c.when().is_some())
    }

    /// The chains (other than `default`) whose conversation type, event type
    /// and conversation key match `event`, in file order. Their `when`
    /// conditions, if any, are still to be evaluated.
    pub fn candidates(&self, event: &VumiApiEvent) -> Vec<&ChainSpec> {
        let mut hits: Vec<usize> = Vec::new();
        for ct in [event.conversation_type.as_str(), ANY] {
            for et in [event.event_type.as_str(), ANY] {
                let hash = match_hash(ct, et);
                let from = self.index.partition_point(|&(h, _)| h < hash);
                hits.extend(
                    self.index[from..]
                        .iter()
                        .take_while(|&&(h, _)| h == hash)
                        // Another pair of types may hash alike.
                        .filter(|&&(_, i)| index_key(&self.chains, i) == (ct, et))
                        .map(|&(_, i)| i as usize)
                        .filter(|&i| conversation_matches(&self.chains[i], event)),
                );
            }
        }
        hits.sort_unstable();
        hits.into_iter().map(|i| &self.chains[i]).collect()
    }

    /// The account's `default` chain, if it has one and its match holds for
    /// `event` (its `when`, if any, is still to be evaluated). It runs only
    /// when no candidate runs.
    pub fn default_for(&self, event: &VumiApiEvent) -> Option<&ChainSpec> {
        self.default
            .map(|i| &self.chains[i])
            .filter(|chain| full_match(chain, event))
    }
}

/// What the chain at `position` is indexed by: its conversation type and
/// event type, `*` for any.
fn index_key(chains: &[ChainSpec], position: u32) -> (&str, &str) {
    let chain = &chains[position as usize];
    (
        pattern_key(&chain.conversation_type),
        pattern_key(&chain.event_type),
    )
}

/// The hash a chain is indexed under: of its conversation type and event
/// type, `*` for any. Fixed keys, so the same in every process.
fn match_hash(conversation_type: &str, event_type: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (conversation_type, event_type).hash(&mut hasher);
    hasher.finish()
}

fn conversation_matches(chain: &ChainSpec, event: &VumiApiEvent) -> bool {
    chain
        .conversation_key()
        .is_none_or(|k| *k == event.conversation_key)
}

fn full_match(chain: &ChainSpec, event: &VumiApiEvent) -> bool {
    chain.conversation_type.matches(&event.conversation_type)
        && chain.event_type.matches(&event.event_type)
        && conversation_matches(chain, event)
}
