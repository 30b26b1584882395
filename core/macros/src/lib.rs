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
                ::ionet::task::RemoteFunction { name: NAME, invoke }
            }
        }
    };
    expanded.into()
}
