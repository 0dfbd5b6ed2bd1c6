//! What a compiled script says about itself, read by walking its AST:
//! calls to functions nobody defines, found when the script is stored
//! rather than when an event first reaches the line (Rhai resolves a call
//! only as it runs it), and where its loops are, for limit errors Rhai
//! gives no position for.

use std::collections::HashSet;

use rhai::{AST, ASTNode, Engine, Expr, Position, Stmt};

use super::CompileError;

/// Rhai's keyword functions, which no package lists.
const KEYWORD_FUNCTIONS: &[&str] = &[
    "print",
    "debug",
    "type_of",
    "Fn",
    "call",
    "curry",
    "is_def_fn",
    "is_def_var",
    "is_shared",
];

/// The names of the functions `engine` has (its packages and registered
/// functions), taken from their signatures (`name(a: T, ...) -> R`).
pub(super) fn engine_functions(engine: &Engine) -> HashSet<String> {
    engine
        .gen_fn_signatures(true)
        .into_iter()
        .filter_map(|s| s.split_once('(').map(|(name, _)| name.trim().to_string()))
        .chain(KEYWORD_FUNCTIONS.iter().map(|s| s.to_string()))
        .collect()
}

/// The first call in `ast` to a function that neither the engine (`known`)
/// nor the script defines, with its position and the nearest names.
///
/// Only plain calls are checked: a method call (`x.f()`) may call a
/// function pointer kept in a map. A plain call of a variable (`let f =
/// Fn("g"); f(1)`) is refused: Rhai looks for a function of that name.
pub(super) fn check_calls(ast: &AST, known: &HashSet<String>) -> Result<(), CompileError> {
    let defined: Vec<(String, usize)> = ast
        .iter_functions()
        .map(|f| (f.name.to_string(), f.params.len()))
        .collect();
    let mut variables: HashSet<String> = ast
        .iter_functions()
        .flat_map(|f| f.params.iter().map(|p| p.to_string()).collect::<Vec<_>>())
        .collect();
    ast.walk(&mut |path: &[ASTNode<'_>]| {
        match path.last() {
            Some(ASTNode::Stmt(Stmt::Var(x, ..))) => {
                variables.insert(x.0.name.to_string());
            }
            Some(ASTNode::Stmt(Stmt::For(x, ..))) => {
                variables.insert(x.0.name.to_string());
                if let Some(counter) = &x.1 {
                    variables.insert(counter.name.to_string());
                }
            }
            _ => {}
        }
        true
    });
    let mut found = None;
    ast.walk(&mut |path: &[ASTNode<'_>]| {
        let (call, pos) = match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(call, pos)))
            | Some(ASTNode::Stmt(Stmt::FnCall(call, pos))) => (call, pos),
            _ => return true,
        };
        let name = call.name.as_str();
        if call.op_token.is_some() || call.is_qualified() || known.contains(name) {
            return true;
        }
        let arity = call.args.len();
        if defined.iter().any(|(n, a)| n == name && *a == arity) {
            return true;
        }
        let arities: Vec<usize> = defined
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .collect();
        let message = if arities.is_empty() && variables.contains(name) {
            // Rhai calls no function through a variable: `f(1)` looks for a
            // function named `f`.
            format!(
                "`{name}` is a variable, not a function: if it holds a function pointer (`Fn(...)`, \
                 a closure), call it as `{name}.call(...)`"
            )
        } else if arities.is_empty() {
            let mut message = format!("no function `{name}` is defined");
            if let Some(near) = nearest(name, known, &defined) {
                message.push_str(&format!(" (did you mean `{near}`?)"));
            }
            message.push_str(&format!(
                "; scripts may call {} and the functions they define",
                super::SCRIPT_FUNCTIONS
            ));
            message
        } else {
            let takes: Vec<String> = arities.iter().map(ToString::to_string).collect();
            format!(
                "`{name}` is called with {arity} argument(s), but the script defines it with {}",
                takes.join(" or ")
            )
        };
        found = Some(CompileError {
            line: pos.line(),
            column: pos.position(),
            message,
        });
        false
    });
    match found {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The known name closest to `name`, if one is close enough to be a typo.
fn nearest<'a>(
    name: &str,
    known: &'a HashSet<String>,
    defined: &'a [(String, usize)],
) -> Option<&'a str> {
    // Too short to tell a typo from another name.
    if name.chars().count() < 3 {
        return None;
    }
    known
        .iter()
        .map(String::as_str)
        .chain(defined.iter().map(|(n, _)| n.as_str()))
        // Operators and property accessors (`get$x`) are not called by name.
        .filter(|k| {
            k.chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
        })
        .filter(|k| !k.contains('$'))
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        // One edit in four characters, at least one: `to_jsn` is `to_json`,
        // `sendd` is not `end`.
        .filter(|(d, _)| *d <= (name.chars().count() / 4).max(1))
        .min()
        .map(|(_, k)| k)
}

/// Where a script may run long, for a limit error Rhai gives no position
/// for: the lines of its loops, or `None` when it has none.
pub(super) fn loop_lines(ast: &AST) -> Option<String> {
    let mut lines = Vec::new();
    ast.walk(&mut |path: &[ASTNode<'_>]| {
        if let Some(ASTNode::Stmt(Stmt::While(_, pos) | Stmt::Do(_, _, pos) | Stmt::For(_, pos))) =
            path.last()
            && let Some(line) = pos.line()
        {
            lines.push(line);
        }
        true
    });
    lines.sort_unstable();
    lines.dedup();
    match lines.as_slice() {
        [] => None,
        [one] => Some(format!("its loop is at line {one}")),
        [first @ .., last] => {
            let first: Vec<String> = first.iter().map(ToString::to_string).collect();
            Some(format!(
                "its loops are at lines {} and {last}",
                first.join(", ")
            ))
        }
    }
}

/// A field a script reads, as it wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FieldPath {
    /// The whole read: `event.event_data.percent`.
    pub path: String,
    /// What it is read from: `event.event_data`.
    pub parent: String,
    /// The key, as a Rhai string for an `in` test (`"percent"`); `None`
    /// for an array index.
    pub key: Option<String>,
}

/// The field a failed read or operand names, as the script wrote it
/// (`event.event_data.percent`), found by the error's position: the
/// property read at `pos` (a strict-fields error), or the `()` operand
/// `operand` of the operator or call at `pos`.
pub(super) fn path_at(ast: &AST, pos: Position, operand: Option<usize>) -> Option<FieldPath> {
    let mut found = None;
    ast.walk(&mut |path: &[ASTNode<'_>]| {
        found = match (path.last(), operand) {
            (
                Some(ASTNode::Expr(Expr::FnCall(call, at)))
                | Some(ASTNode::Stmt(Stmt::FnCall(call, at))),
                Some(i),
            ) if *at == pos => call.args.get(i).and_then(|a| field_paths(a).pop()),
            (Some(ASTNode::Expr(expr @ (Expr::Dot(..) | Expr::Index(..)))), None) => {
                field_paths(expr).into_iter().find(|f| f.0 == pos)
            }
            _ => None,
        }
        .map(|(_, f)| f);
        found.is_none()
    });
    found
}

/// Each field a chain of reads (`event.event_data.percent`) reads, with
/// the position of its name; empty when the chain is not a plain path from
/// a variable.
fn field_paths(expr: &Expr) -> Vec<(Position, FieldPath)> {
    let (Expr::Dot(x, ..) | Expr::Index(x, ..)) = expr else {
        return Vec::new();
    };
    let Expr::Variable(root, ..) = &x.lhs else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if !chain(root.1.as_str(), expr, &x.rhs, &mut out) {
        return Vec::new();
    }
    out
}

/// Appends the fields `rhs` reads after `prefix` (joined as `expr`, a `.`
/// or an index, joins them); false when a part is not a plain field.
fn chain(prefix: &str, expr: &Expr, rhs: &Expr, out: &mut Vec<(Position, FieldPath)>) -> bool {
    let dot = matches!(expr, Expr::Dot(..));
    let mut push = |pos: Position, path: String, key: Option<String>| {
        out.push((
            pos,
            FieldPath {
                path,
                parent: prefix.to_string(),
                key,
            },
        ));
    };
    match rhs {
        Expr::Property(p, pos) if dot => {
            let name = p.2.as_str();
            push(*pos, format!("{prefix}.{name}"), Some(format!("{name:?}")));
            true
        }
        Expr::StringConstant(k, pos) if !dot => {
            let key = format!("{:?}", k.as_str());
            push(*pos, format!("{prefix}[{key}]"), Some(key));
            true
        }
        Expr::IntegerConstant(n, pos) if !dot => {
            push(*pos, format!("{prefix}[{n}]"), None);
            true
        }
        Expr::Dot(x, ..) | Expr::Index(x, ..) => {
            let mut first = Vec::new();
            if !chain(prefix, expr, &x.lhs, &mut first) {
                return false;
            }
            let Some(joined) = first.last().map(|(_, f)| f.path.clone()) else {
                return false;
            };
            out.extend(first);
            chain(&joined, rhs, &x.rhs, out)
        }
        _ => false,
    }
}
