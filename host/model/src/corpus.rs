//! The synthetic corpus the embedded model is trained and evaluated on.
//!
//! Every document needs retrieval from earlier in the context: records
//! `user secret of <name> <4 digits> .` mixed with filler, then questions
//! `query secret of <name> <digits> .`; or a chat in which the user asks the
//! assistant to remember a code and later asks for it back (`your code <digits>`).
//! A question ends with the word that precedes the secret in its record (the
//! name), so the answer is a copy of what followed that word: the one-token
//! induction pattern small transformers learn fastest. (With the name two tokens
//! before the digits, as in `<name> secret <digits>`, a tiny model trained on two
//! CPU cores never found the two-token match.) Names, filler and phrasings come
//! from the fixed lists beside this file; everything else from a seeded RNG, so a
//! seed names a corpus.

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NAMES: &str = include_str!("corpus/names.txt");
const FILLER: &str = include_str!("corpus/filler.txt");
const CHAT: &str = include_str!("corpus/chat.txt");

/// The corpus's filler sentences, one per line of its list.
pub fn filler_sentences() -> impl Iterator<Item = &'static str> {
    FILLER.lines().filter(|l| !l.is_empty())
}

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// A piece of a document; `target` marks the text a model must produce from the
/// context (the recalled digits), which training weighs more and evaluation checks.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Segment {
    pub text: String,
    pub target: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Document {
    pub segments: Vec<Segment>,
}

impl Document {
    fn push(&mut self, text: impl Into<String>, target: bool) {
        self.segments.push(Segment { text: text.into(), target });
    }

    pub fn text(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect()
    }
}

/// A recall question for evaluation: `context + question` is the prompt (the same
/// text as a training document's), and a model that read the context answers
/// `answer`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RecallItem {
    pub context: String,
    pub question: String,
    pub answer: String,
}

struct Chat {
    remember: Vec<&'static str>,
    ack: Vec<&'static str>,
    ask: Vec<&'static str>,
    small_talk: Vec<(&'static str, &'static str)>,
}

fn lines(text: &'static str) -> Vec<&'static str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
}

fn chat_lists() -> Chat {
    let mut chat = Chat { remember: vec![], ack: vec![], ask: vec![], small_talk: vec![] };
    let mut section = "";
    for line in lines(CHAT) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        match section {
            "[remember]" => chat.remember.push(line),
            "[ack]" => chat.ack.push(line),
            "[ask]" => chat.ask.push(line),
            "[small-talk]" => {
                let (q, a) = line.split_once(" | ").expect("small-talk lines are `question | answer`");
                chat.small_talk.push((q, a));
            }
            other => panic!("chat.txt: unknown section {other:?}"),
        }
    }
    chat
}

pub fn names() -> Vec<&'static str> {
    lines(NAMES)
}

/// Four random digits, as text.
pub fn secret(rng: &mut impl Rng) -> String {
    (0..4).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect()
}

/// The corpus generator. Two generators with the same seed produce the same documents.
pub struct Corpus {
    rng: ChaCha8Rng,
    names: Vec<&'static str>,
    filler: Vec<&'static str>,
    chat: Chat,
}

impl Corpus {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed), names: names(), filler: lines(FILLER), chat: chat_lists() }
    }

    /// `k` records with distinct names, filler between them; returns the record
    /// text and the (name, secret) pairs in order.
    fn records(&mut self, k: usize) -> (String, Vec<(&'static str, String)>) {
        let chosen: Vec<&'static str> = self.names.choose_multiple(&mut self.rng, k).copied().collect();
        let mut text = String::new();
        let mut pairs = Vec::with_capacity(k);
        for name in chosen {
            if self.rng.random_bool(0.5) {
                let f = self.filler.choose(&mut self.rng).expect("filler list is not empty");
                text += f;
                text.push(' ');
            }
            let code = secret(&mut self.rng);
            text += &format!("user secret of {name} {code} . ");
            pairs.push((name, code));
        }
        (text, pairs)
    }

    /// Records followed by up to `questions` questions about them, in random order.
    pub fn records_document(&mut self, k: usize, questions: usize) -> Document {
        let (text, mut pairs) = self.records(k);
        let mut doc = Document::default();
        doc.push(text, false);
        pairs.shuffle(&mut self.rng);
        for (name, code) in pairs.into_iter().take(questions) {
            doc.push(format!("query secret of {name}"), false);
            doc.push(format!(" {code}"), true);
            doc.push(" . ", false);
        }
        doc
    }

    /// A conversation in which the user leaves a code and later asks for it.
    pub fn chat_document(&mut self) -> Document {
        let code = secret(&mut self.rng);
        let mut doc = Document::default();
        let turn = |doc: &mut Document, user: &str, assistant: &str| {
            doc.push(format!("{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"), false);
        };
        for _ in 0..self.rng.random_range(0..3) {
            let (q, a) = *self.chat.small_talk.choose(&mut self.rng).expect("small talk");
            turn(&mut doc, q, a);
        }
        let remember = self.chat.remember.choose(&mut self.rng).expect("phrasings").replace("{code}", &code);
        let ack = *self.chat.ack.choose(&mut self.rng).expect("phrasings");
        turn(&mut doc, &remember, ack);
        for _ in 0..self.rng.random_range(0..3) {
            let (q, a) = *self.chat.small_talk.choose(&mut self.rng).expect("small talk");
            turn(&mut doc, q, a);
        }
        let ask = *self.chat.ask.choose(&mut self.rng).expect("phrasings");
        doc.push(format!("{IM_START}user\n{ask}{IM_END}\n{IM_START}assistant\n"), false);
        doc.push(format!("your code {code}"), true);
        doc.push(IM_END, true);
        doc.push("\n", false);
        doc
    }

    /// One training document: records (1 to 16, each possibly asked about) or a
    /// chat, mixed 3 : 2.
    pub fn training_document(&mut self) -> Document {
        if self.rng.random_bool(0.6) {
            let k = self.rng.random_range(1..=16);
            let questions = self.rng.random_range(1..=k);
            self.records_document(k, questions)
        } else {
            self.chat_document()
        }
    }

    /// An evaluation item: `k` records, one question about a random one of them.
    pub fn recall_item(&mut self, k: usize) -> RecallItem {
        let (context, pairs) = self.records(k);
        let (name, code) = pairs.choose(&mut self.rng).expect("k >= 1").clone();
        // The question keeps its leading space, so the context's tokens are a prefix
        // of the whole prompt's (byte-level BPE splits before a space).
        RecallItem {
            context: context.trim_end().to_owned(),
            question: format!(" query secret of {name}"),
            answer: format!(" {code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_a_corpus() {
        let a: Vec<String> = (0..20).map(|_| Corpus::new(4).training_document().text()).collect();
        let b: Vec<String> = (0..20).map(|_| Corpus::new(4).training_document().text()).collect();
        assert_eq!(a, b);
        assert_ne!(Corpus::new(4).training_document().text(), Corpus::new(5).training_document().text());
    }

    #[test]
    fn every_question_is_answered_by_a_record_in_the_context() {
        let mut c = Corpus::new(1);
        for k in 1..=16 {
            let item = c.recall_item(k);
            let name = item.question.trim_start_matches(" query secret of ");
            assert!(item.context.contains(&format!("user secret of {name}{} .", item.answer)), "{item:?}");
            assert_eq!(item.context.matches("user ").count(), k);
        }
        for _ in 0..20 {
            let chat = c.chat_document();
            let answer = chat.segments.iter().find(|s| s.target).unwrap().text.clone();
            let code = answer.strip_prefix("your code ").unwrap();
            assert!(code.len() == 4 && code.bytes().all(|b| b.is_ascii_digit()), "{answer:?}");
            // Once where the user leaves it, once in the answer.
            assert_eq!(chat.text().matches(&format!("code {code}")).count(), 2, "{}", chat.text());
        }
    }
}
