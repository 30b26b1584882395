//! `#[ionet::remote]`: turns a plain function into a remote function.
//!
//! For `fn add(a: i64, b: i64) -> i64` the function stays as written (callable
//! locally) and a module of the same name is generated beside it (modules and
//! functions live in different namespaces), holding:
//! - `add::remote(a, b) -> ObjectRef<i64>`: each argument a value or an `ObjectRef`;
//! - `add::options(TaskOptions) -> add::Call`, whose `.remote(..)` takes the same
//!   arguments with per-call options;
//! - a registration in the process-wide registry under `add::NAME` (the module path),
//!   so a worker process, the same binary re-executed, finds the function by name.
//!
//! A function returning `Result<T, E>` (E: Display) yields `ObjectRef<T>`; an `Err`
//! becomes a task error carrying `E`'s message.
//!
//! A function returning an iterator (`impl Iterator<Item = T>`, or a
//! `Box<dyn Iterator<Item = T>>`) is a generator task: `f::remote(..)` returns an
//! `ObjectRefGenerator<T>` whose items arrive while the task still runs, with
//! backpressure (see `ionet::generator`); the task's own value is the number of items
//! it produced (it stops early once the consumer drops the generator).

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::{parse_macro_input, FnArg, GenericArgument, ItemFn, Pat, PathArguments, ReturnType, Type};

/// The `T` of `Result<T, _>` when the return type is spelled as a `Result`.
fn result_ok_type(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else { return None };
    match args.args.first()? {
        GenericArgument::Type(ok) => Some(ok),
        _ => None,
    }
}

/// The `T` of `impl Iterator<Item = T>` or `Box<dyn Iterator<Item = T>>`.
fn iterator_item_type(ty: &Type) -> Option<Type> {
    let bounds = match ty {
        Type::ImplTrait(bounds) => &bounds.bounds,
        Type::Path(path) => {
            let last = path.path.segments.last()?;
            if last.ident != "Box" {
                return None;
            }
            let PathArguments::AngleBracketed(args) = &last.arguments else { return None };
            let Some(GenericArgument::Type(Type::TraitObject(object))) = args.args.first() else { return None };
            &object.bounds
        }
        _ => return None,
    };
    bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else { return None };
        let last = bound.path.segments.last()?;
        if last.ident != "Iterator" {
            return None;
        }
        let PathArguments::AngleBracketed(args) = &last.arguments else { return None };
        args.args.iter().find_map(|arg| match arg {
            GenericArgument::AssocType(assoc) if assoc.ident == "Item" => Some(assoc.ty.clone()),
            _ => None,
        })
    })
}

#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[ionet::remote] takes no arguments; pass options per call with `f::options(..)`",
        )
        .to_compile_error()
        .into();
    }
    let function = parse_macro_input!(item as ItemFn);
    let name = &function.sig.ident;
    let visibility = &function.vis;
    if let Some(asyncness) = &function.sig.asyncness {
        return syn::Error::new_spanned(asyncness, "remote functions are synchronous for now")
            .to_compile_error()
            .into();
    }
    if !function.sig.generics.params.is_empty() {
        return syn::Error::new_spanned(&function.sig.generics, "remote functions cannot be generic")
            .to_compile_error()
            .into();
    }

    let mut arg_names = Vec::new();
    let mut arg_types = Vec::new();
    for (index, input) in function.sig.inputs.iter().enumerate() {
        match input {
            FnArg::Typed(typed) => {
                let ident = match &*typed.pat {
                    Pat::Ident(ident) => ident.ident.clone(),
                    _ => format_ident!("arg{}", index),
                };
                arg_names.push(ident);
                arg_types.push((*typed.ty).clone());
            }
            FnArg::Receiver(receiver) => {
                return syn::Error::new_spanned(receiver, "remote functions cannot take self")
                    .to_compile_error()
                    .into();
            }
        }
    }
    let unit: Type = syn::parse_quote!(());
    let return_type = match &function.sig.output {
        ReturnType::Default => unit.clone(),
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    if let Some(item_type) = iterator_item_type(&return_type) {
        return generator_task(&function, &arg_names, &arg_types, &item_type);
    }
    let (value_type, fallible) = match result_ok_type(&return_type) {
        Some(ok) => (ok.clone(), true),
        None => (return_type.clone(), false),
    };
    let indices: Vec<usize> = (0..arg_names.len()).collect();
    let count = arg_names.len();
    let call_body = if fallible {
        quote! {
            match super::#name(#(#arg_names),*) {
                ::std::result::Result::Ok(value) => ::ionet::task::encode_return(&value),
                ::std::result::Result::Err(error) => ::std::result::Result::Err(::ionet::task::Failure::error(error.to_string())),
            }
        }
    } else {
        quote! {
            let value = super::#name(#(#arg_names),*);
            ::ionet::task::encode_return(&value)
        }
    };

    let expanded = quote! {
        #function

        #[allow(non_snake_case, non_camel_case_types, dead_code, clippy::too_many_arguments)]
        #visibility mod #name {
            use super::*;

            /// The name the function is registered under.
            pub const NAME: &str = ::std::module_path!();

            /// Submits a call with default options.
            pub fn remote(#(#arg_names: impl ::ionet::IntoArg<#arg_types>),*) -> ::ionet::ObjectRef<#value_type> {
                Call(::ionet::TaskOptions::default()).remote(#(#arg_names),*)
            }

            /// Submits calls with these options.
            pub fn options(options: ::ionet::TaskOptions) -> Call {
                Call(options)
            }

            pub struct Call(::ionet::TaskOptions);

            impl Call {
                pub fn remote(self, #(#arg_names: impl ::ionet::IntoArg<#arg_types>),*) -> ::ionet::ObjectRef<#value_type> {
                    ::ionet::task::submit(NAME, self.0, ::std::vec![#(::ionet::IntoArg::<#arg_types>::into_arg(#arg_names)),*])
                }
            }

            fn invoke(args: ::std::vec::Vec<::ionet::task::ArgBytes>) -> ::std::result::Result<::std::vec::Vec<u8>, ::ionet::task::Failure> {
                if args.len() != #count {
                    return ::std::result::Result::Err(::ionet::task::Failure::bad_arguments(
                        ::std::format!("{} takes {} argument(s), got {}", NAME, #count, args.len()),
                    ));
                }
                #(let #arg_names: #arg_types = ::ionet::task::decode_arg(&args[#indices], #indices)?;)*
                #call_body
            }

            ::ionet::inventory::submit! {
                ::ionet::task::RemoteFunction { name: NAME, invoke, in_place: true }
            }
        }
    };
    expanded.into()
}

/// `#[ionet::remote]` on a function returning an iterator of `item_type`: the task takes
/// a `GeneratorSink` after the function's own arguments and sends each item through it,
/// stopping early when the consumer is gone.
fn generator_task(function: &ItemFn, arg_names: &[syn::Ident], arg_types: &[Type], item_type: &Type) -> TokenStream {
    let name = &function.sig.ident;
    let visibility = &function.vis;
    let indices: Vec<usize> = (0..arg_names.len()).collect();
    let count = arg_names.len();
    let sink_index = count;
    let expanded = quote! {
        #function

        #[allow(non_snake_case, non_camel_case_types, dead_code, clippy::too_many_arguments)]
        #visibility mod #name {
            use super::*;

            /// The name the function is registered under.
            pub const NAME: &str = ::std::module_path!();

            /// Starts the generator with default options: its items, as they are produced.
            pub fn remote(#(#arg_names: impl ::ionet::IntoArg<#arg_types>),*) -> ::ionet::ObjectRefGenerator<#item_type> {
                Call(::ionet::TaskOptions::default(), ::ionet::generator::DEFAULT_BACKPRESSURE).remote(#(#arg_names),*)
            }

            /// Starts generators with these options.
            pub fn options(options: ::ionet::TaskOptions) -> Call {
                Call(options, ::ionet::generator::DEFAULT_BACKPRESSURE)
            }

            pub struct Call(::ionet::TaskOptions, u64);

            impl Call {
                /// The producer waits while this many items are unread (Ray's
                /// `_generator_backpressure_num_objects`).
                pub fn backpressure(self, items: u64) -> Self {
                    Call(self.0, items.max(1))
                }

                pub fn remote(self, #(#arg_names: impl ::ionet::IntoArg<#arg_types>),*) -> ::ionet::ObjectRefGenerator<#item_type> {
                    let Call(options, backpressure) = self;
                    let mut args = ::std::vec![#(::ionet::IntoArg::<#arg_types>::into_arg(#arg_names)),*];
                    ::ionet::stream_with_backpressure(backpressure, |sink: ::ionet::GeneratorSink<#item_type>| {
                        args.push(::ionet::IntoArg::<::ionet::GeneratorSink<#item_type>>::into_arg(sink));
                        ::ionet::task::submit::<u64>(NAME, options, args)
                    })
                    .expect("ionet::init must be called before a remote function")
                }
            }

            fn invoke(args: ::std::vec::Vec<::ionet::task::ArgBytes>) -> ::std::result::Result<::std::vec::Vec<u8>, ::ionet::task::Failure> {
                if args.len() != #count + 1 {
                    return ::std::result::Result::Err(::ionet::task::Failure::bad_arguments(
                        ::std::format!("{} takes {} argument(s) and a sink, got {}", NAME, #count, args.len()),
                    ));
                }
                #(let #arg_names: #arg_types = ::ionet::task::decode_arg(&args[#indices], #indices)?;)*
                let sink: ::ionet::GeneratorSink<#item_type> = ::ionet::task::decode_arg(&args[#sink_index], #sink_index)?;
                let mut sent = 0u64;
                for item in super::#name(#(#arg_names),*) {
                    match sink.send(&item) {
                        ::std::result::Result::Ok(true) => sent += 1,
                        ::std::result::Result::Ok(false) => {
                            sent += 1; // handed over, but the consumer is gone: stop
                            break;
                        }
                        ::std::result::Result::Err(error) => {
                            return ::std::result::Result::Err(::ionet::task::Failure::error(::std::format!(
                                "item {} of {}: {}", sent, NAME, error
                            )))
                        }
                    }
                }
                ::ionet::task::encode_return(&sent)
            }

            ::ionet::inventory::submit! {
                ::ionet::task::RemoteFunction { name: NAME, invoke, in_place: true }
            }
        }
    };
    expanded.into()
}

/// The receiver of a method: `&self` (shared) or `&mut self` (exclusive).
enum Receiver {
    Shared,
    Exclusive,
}

struct Method {
    name: syn::Ident,
    receiver: Receiver,
    is_async: bool,
    arg_names: Vec<syn::Ident>,
    arg_types: Vec<Type>,
    value_type: Type,
    fallible: bool,
}

fn typed_args(inputs: impl Iterator<Item = FnArg>) -> syn::Result<(Vec<syn::Ident>, Vec<Type>)> {
    let mut names = Vec::new();
    let mut types = Vec::new();
    for (index, input) in inputs.enumerate() {
        let FnArg::Typed(typed) = input else { continue };
        names.push(match &*typed.pat {
            Pat::Ident(ident) => ident.ident.clone(),
            _ => format_ident!("arg{}", index),
        });
        types.push((*typed.ty).clone());
    }
    Ok((names, types))
}

fn returns(output: &ReturnType) -> (Type, bool) {
    let unit: Type = syn::parse_quote!(());
    let return_type = match output {
        ReturnType::Default => unit,
        ReturnType::Type(_, ty) => (**ty).clone(),
    };
    match result_ok_type(&return_type) {
        Some(ok) => (ok.clone(), true),
        None => (return_type, false),
    }
}

/// `#[ionet::actor]` on an `impl` block: the type becomes an actor class.
///
/// For `impl Counter { fn new(start: i64) -> Self; fn incr(&mut self, by: i64) -> i64 }`:
/// - `Counter::remote(start) -> IonetResult<CounterHandle>` and
///   `Counter::options(ActorOptions).remote(start)` create an actor (the constructor is the
///   method `new`, returning `Self` or `Result<Self, E>`);
/// - `CounterHandle` (clonable, serialisable) has one method per `&self`/`&mut self`
///   method, taking values or refs and returning `ObjectRef<R>` at once;
/// - the class is registered so worker processes (the same binary) can host it.
///
/// `&self` methods may run concurrently (with `max_concurrency > 1`); `&mut self` methods
/// run alone. Plain methods run on blocking threads; `async fn` methods run on the
/// worker's event loop (with `max_concurrency > 1`, interleaved at their awaits). The type
/// must be `Send + Sync + 'static`, and an async method's future `Send`.
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[ionet::actor] takes no arguments; pass options at creation with `T::options(..)`",
        )
        .to_compile_error()
        .into();
    }
    let block = parse_macro_input!(item as syn::ItemImpl);
    match expand_actor(&block) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand_actor(block: &syn::ItemImpl) -> syn::Result<proc_macro2::TokenStream> {
    if block.trait_.is_some() || !block.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &block.self_ty,
            "#[ionet::actor] goes on a plain inherent `impl Type { .. }` block without generics",
        ));
    }
    let Type::Path(type_path) = &*block.self_ty else {
        return Err(syn::Error::new_spanned(&block.self_ty, "#[ionet::actor] needs a named type"));
    };
    let type_name = type_path.path.segments.last().expect("a path has a segment").ident.clone();
    let handle_name = format_ident!("{}Handle", type_name);
    let create_name = format_ident!("{}Create", type_name);
    let class_name = type_name.to_string();

    let mut constructor: Option<(Vec<syn::Ident>, Vec<Type>, bool)> = None;
    let mut methods = Vec::new();
    for item in &block.items {
        let syn::ImplItem::Fn(function) = item else { continue };
        let sig = &function.sig;
        let receiver = sig.inputs.iter().find_map(|input| match input {
            FnArg::Receiver(receiver) => Some(receiver.clone()),
            _ => None,
        });
        match receiver {
            None => {
                if sig.ident == "new" {
                    let (names, types) = typed_args(sig.inputs.iter().cloned())?;
                    let (_, fallible) = returns(&sig.output);
                    constructor = Some((names, types, fallible));
                }
            }
            Some(receiver) => {
                if !sig.generics.params.is_empty() {
                    return Err(syn::Error::new_spanned(&sig.generics, "actor methods cannot be generic"));
                }
                let kind = match (&receiver.reference, &receiver.mutability) {
                    (Some(_), None) => Receiver::Shared,
                    (Some(_), Some(_)) => Receiver::Exclusive,
                    (None, _) => {
                        return Err(syn::Error::new_spanned(receiver, "actor methods take &self or &mut self"))
                    }
                };
                let (arg_names, arg_types) = typed_args(sig.inputs.iter().cloned())?;
                let (value_type, fallible) = returns(&sig.output);
                methods.push(Method {
                    name: sig.ident.clone(),
                    receiver: kind,
                    is_async: sig.asyncness.is_some(),
                    arg_names,
                    arg_types,
                    value_type,
                    fallible,
                });
            }
        }
    }
    let Some((ctor_names, ctor_types, ctor_fallible)) = constructor else {
        return Err(syn::Error::new_spanned(
            &block.self_ty,
            "an actor needs a constructor in this block: `fn new(..) -> Self` (or -> Result<Self, E>)",
        ));
    };

    let ctor_indices: Vec<usize> = (0..ctor_names.len()).collect();
    let ctor_count = ctor_names.len();
    let construct_value = if ctor_fallible {
        quote! {
            match #type_name::new(#(#ctor_names),*) {
                ::std::result::Result::Ok(value) => value,
                ::std::result::Result::Err(error) => return ::std::result::Result::Err(::ionet::task::Failure::error(error.to_string())),
            }
        }
    } else {
        quote! { #type_name::new(#(#ctor_names),*) }
    };

    let mut handle_methods = Vec::new();
    let mut dispatch_arms = Vec::new();
    for method in &methods {
        let Method { name, receiver, is_async, arg_names, arg_types, value_type, fallible } = method;
        let method_name = name.to_string();
        let count = arg_names.len();
        let indices: Vec<usize> = (0..count).collect();
        handle_methods.push(quote! {
            pub fn #name(&self, #(#arg_names: impl ::ionet::IntoArg<#arg_types>),*) -> ::ionet::ObjectRef<#value_type> {
                self.0.call(#method_name, ::std::vec![#(::ionet::IntoArg::<#arg_types>::into_arg(#arg_names)),*])
            }
        });
        let awaited = if *is_async {
            quote! { .await }
        } else {
            quote! {}
        };
        let invoke = if *fallible {
            quote! {
                match this.#name(#(#arg_names),*) #awaited {
                    ::std::result::Result::Ok(value) => ::ionet::task::encode_return(&value),
                    ::std::result::Result::Err(error) => ::std::result::Result::Err(::ionet::task::Failure::error(error.to_string())),
                }
            }
        } else {
            quote! {
                let value = this.#name(#(#arg_names),*) #awaited;
                ::ionet::task::encode_return(&value)
            }
        };
        let run = match (receiver, is_async) {
            (Receiver::Shared, false) => quote! {
                ::ionet::actor::MethodCall::Blocking(::std::boxed::Box::new(move || {
                    let guard = ::ionet::actor::read_state::<#type_name>(&instance)?;
                    let this = guard.downcast_ref::<#type_name>().expect("the state type was checked");
                    #invoke
                }))
            },
            (Receiver::Exclusive, false) => quote! {
                ::ionet::actor::MethodCall::Blocking(::std::boxed::Box::new(move || {
                    let mut guard = ::ionet::actor::write_state::<#type_name>(&instance)?;
                    let this = guard.downcast_mut::<#type_name>().expect("the state type was checked");
                    #invoke
                }))
            },
            (Receiver::Shared, true) => quote! {
                ::ionet::actor::MethodCall::Async(::std::boxed::Box::pin(async move {
                    let guard = ::ionet::actor::read_state_async::<#type_name>(instance).await?;
                    let this = guard.downcast_ref::<#type_name>().expect("the state type was checked");
                    #invoke
                }))
            },
            (Receiver::Exclusive, true) => quote! {
                ::ionet::actor::MethodCall::Async(::std::boxed::Box::pin(async move {
                    let mut guard = ::ionet::actor::write_state_async::<#type_name>(instance).await?;
                    let this = guard.downcast_mut::<#type_name>().expect("the state type was checked");
                    #invoke
                }))
            },
        };
        dispatch_arms.push(quote! {
            #method_name => {
                if args.len() != #count {
                    return ::std::result::Result::Err(::ionet::task::Failure::bad_arguments(
                        ::std::format!("{}.{} takes {} argument(s), got {}", #class_name, #method_name, #count, args.len()),
                    ));
                }
                #(let #arg_names: #arg_types = ::ionet::task::decode_arg(&args[#indices], #indices)?;)*
                ::std::result::Result::Ok(#run)
            }
        });
    }

    Ok(quote! {
        #block

        /// A handle to an actor of this class: clone it, send it to tasks and actors.
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub struct #handle_name(::ionet::ActorHandle);

        impl ::ionet::ActorClassHandle for #handle_name {
            const CLASS: &'static str = ::std::concat!(::std::module_path!(), "::", #class_name);
            fn from_handle(handle: ::ionet::ActorHandle) -> Self {
                #handle_name(handle)
            }
            fn handle(&self) -> &::ionet::ActorHandle {
                &self.0
            }
        }

        impl ::ionet::serde::Serialize for #handle_name {
            fn serialize<S: ::ionet::serde::Serializer>(&self, serializer: S) -> ::std::result::Result<S::Ok, S::Error> {
                ::ionet::serde::Serialize::serialize(&self.0, serializer)
            }
        }

        impl<'de> ::ionet::serde::Deserialize<'de> for #handle_name {
            fn deserialize<D: ::ionet::serde::Deserializer<'de>>(deserializer: D) -> ::std::result::Result<Self, D::Error> {
                <::ionet::ActorHandle as ::ionet::serde::Deserialize>::deserialize(deserializer).map(#handle_name)
            }
        }

        #[allow(clippy::too_many_arguments)]
        impl #handle_name {
            #(#handle_methods)*

            /// The untyped handle (its id, its row in the control store).
            pub fn actor_handle(&self) -> &::ionet::ActorHandle {
                &self.0
            }
        }

        /// Creates actors of this class with options.
        pub struct #create_name(::ionet::ActorOptions);

        #[allow(clippy::too_many_arguments)]
        impl #create_name {
            pub fn remote(self, #(#ctor_names: impl ::ionet::IntoArg<#ctor_types>),*) -> ::ionet::IonetResult<#handle_name> {
                ::ionet::create_actor(
                    <#handle_name as ::ionet::ActorClassHandle>::CLASS,
                    self.0,
                    ::std::vec![#(::ionet::IntoArg::<#ctor_types>::into_arg(#ctor_names)),*],
                )
                .map(#handle_name)
            }
        }

        #[allow(clippy::too_many_arguments)]
        impl #type_name {
            /// Creates an actor with default options (runs `new` in a worker).
            pub fn remote(#(#ctor_names: impl ::ionet::IntoArg<#ctor_types>),*) -> ::ionet::IonetResult<#handle_name> {
                #create_name(::ionet::ActorOptions::default()).remote(#(#ctor_names),*)
            }

            /// Creates actors with these options.
            pub fn options(options: ::ionet::ActorOptions) -> #create_name {
                #create_name(options)
            }
        }

        const _: () = {
            fn construct(
                args: ::std::vec::Vec<::ionet::task::ArgBytes>,
            ) -> ::std::result::Result<::std::boxed::Box<dyn ::std::any::Any + Send + Sync>, ::ionet::task::Failure> {
                if args.len() != #ctor_count {
                    return ::std::result::Result::Err(::ionet::task::Failure::bad_arguments(
                        ::std::format!("{}::new takes {} argument(s), got {}", #class_name, #ctor_count, args.len()),
                    ));
                }
                #(let #ctor_names: #ctor_types = ::ionet::task::decode_arg(&args[#ctor_indices], #ctor_indices)?;)*
                let value: #type_name = #construct_value;
                ::std::result::Result::Ok(::std::boxed::Box::new(value))
            }

            #[allow(unused_variables, unused_mut)]
            fn call(
                instance: ::std::sync::Arc<::ionet::actor::ActorInstance>,
                method: &str,
                args: ::std::vec::Vec<::ionet::task::ArgBytes>,
            ) -> ::std::result::Result<::ionet::actor::MethodCall, ::ionet::task::Failure> {
                match method {
                    #(#dispatch_arms)*
                    other => ::std::result::Result::Err(::ionet::task::Failure::unknown_function(
                        ::std::format!("actor class {} has no method {}", #class_name, other),
                    )),
                }
            }

            ::ionet::inventory::submit! {
                ::ionet::actor::ActorClass {
                    name: <#handle_name as ::ionet::ActorClassHandle>::CLASS,
                    construct,
                    call,
                    in_place: true,
                }
            }
        };
    })
}
